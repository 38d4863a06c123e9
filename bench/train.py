"""Trainer overhead: tokens/s of `python -m trainer`'s loop (Lightning Fabric) against a plain PyTorch loop
over the same model, batches, precision and optimizer, interleaved in one process on one machine.

    python -m bench.train --steps 30 --repeats 2 --out bench/results/train.json
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer.config import load_config
from trainer.data import TokenWindows, encode_documents, load_corpus
from trainer.loop import lr_at, step_generator, train
from trainer.run import make_optimizer, resolve_precision
from tzd.diffusion import training_loss
from tzd.models import ModelConfig, build_model
from tzd.tokenizer import Tokenizer, train_tokenizer


def trainer_tokens_per_s(overrides: list[str], out_dir: Path) -> float:
    """Run the real training loop and read its own tokens/s (windows after the first) from the CSV log."""
    cfg = load_config([*overrides, f"out_dir={out_dir}"])
    train(cfg)
    rows = []
    for path in sorted((out_dir / "logs").glob("version_*/metrics.csv")):
        rows += [float(r["tokens_per_s"]) for r in csv.DictReader(open(path)) if r.get("tokens_per_s")]
    return statistics.median(rows[1:])


def plain_tokens_per_s(overrides: list[str], tokenizer_path: Path, warmup: int) -> float:
    """The same steps written as a bare PyTorch loop: autocast, AdamW, clipping, nothing else."""
    cfg = load_config(overrides)
    t = cfg.training
    tok = Tokenizer(tokenizer_path)
    model_cfg = ModelConfig.from_dict({**cfg.model, "vocab_size": tok.vocab_size})
    windows = TokenWindows(encode_documents(tok, load_corpus(cfg.data).train), model_cfg.context_len, "train")
    torch.manual_seed(int(t.seed))
    model = build_model(model_cfg)
    opt = make_optimizer(model, t)
    bf16 = resolve_precision(str(t.precision), "cpu") == "bf16-mixed"
    times = []
    for step in range(int(t.max_steps)):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        g = step_generator(t.seed, step, 0, 0)
        ids = windows.sample(t.batch_size, g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = training_loss(model, ids, tok.mask_id, model_cfg, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # the trainer reads the loss every log step; read it every step here (a worst case for us)
        times.append(time.perf_counter() - t0)
    tokens = t.batch_size * model_cfg.context_len
    return tokens / statistics.median(times[warmup:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/train.json")
    ap.add_argument("overrides", nargs="*", default=["experiment=shakespeare-small"],
                    help="trainer overrides for the model and batch (default: the default model's preset)")
    args = ap.parse_args()
    common = [*args.overrides, f"training.max_steps={args.steps}", "training.eval_every=0",
              "training.sample_every=0", "training.checkpoint_every=0", "training.log_every=5",
              "training.resume=null"]
    work = Path(tempfile.mkdtemp(prefix="tzd-bench-train-"))
    cfg = load_config(common)
    tok_path = train_tokenizer(load_corpus(cfg.data).train, int(cfg.tokenizer.vocab_size), work / "tok.model").path
    common.append(f"tokenizer.path={tok_path}")
    results = {"trainer": [], "plain": []}
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        results["plain"].append(plain_tokens_per_s(common, tok_path, warmup=5))
        results["trainer"].append(trainer_tokens_per_s(common, work / f"run{r}"))
        print(f"repeat {r}: plain {results['plain'][-1]:,.0f} tok/s, trainer {results['trainer'][-1]:,.0f} tok/s")
    plain, fabric = statistics.median(results["plain"]), statistics.median(results["trainer"])
    overhead = 1 - fabric / plain
    summary = {"overrides": args.overrides, "steps": args.steps, "repeats": args.repeats,
               "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
               "plain_tokens_per_s": plain, "trainer_tokens_per_s": fabric, "overhead": overhead, "runs": results}
    print(f"{'loop':<10}{'tokens/s':>12}\n{'plain':<10}{plain:>12,.0f}\n{'trainer':<10}{fabric:>12,.0f}\n"
          f"framework overhead: {overhead:.1%} (target < 10%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
