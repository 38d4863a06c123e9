"""Engine benchmark: the sampler's host overhead per step, and what mixed prompt lengths cost.

Host overhead: `DenoiseBatch.step` on a stand-in model that has the real model's config but whose
forward returns fixed precomputed logits [B, P, V] (a slice, no compute), so that what is left is the
host work of a step and the sampler's tensor ops. Reported in ms per step at batch 1 and 16, 128 new
tokens in blocks of 32 (LLaDA's one token per step), cache none and dual, for the default model's
vocabulary (4096: the commit rule's softmax over [B, P, V] is then most of it) and for 256 (the scale
of the issue's outside measure); the stand-in's own forward time is measured and taken out.

Mixed lengths: the real default model offline through `generate()`: 16 requests with prompt lengths
uniform in [16, 256] and 64 new tokens, against 16 requests whose prompts all have the mean of those
lengths (the same prompt tokens in all); the ratio of their tokens/s.

Results are merged into the JSON under `--label` (e.g. `before` on the unchanged code, `after`).

    python -m bench.engine --label after
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from bench.sampler import held_out_prompts
from server.runtime import inference, load_runtime
from tzd.checkpoint import load_checkpoint
from tzd.models import ForwardContext, ModelConfig, model_config
from tzd.sampling import DenoiseBatch, SamplingParams, generate, plan


class FixedLogits(nn.Module):
    """A model with `cfg`'s attributes whose forward returns fixed logits at the asked positions."""

    def __init__(self, cfg: ModelConfig, rows: int, cols: int, seed: int = 0) -> None:
        super().__init__()
        self.tzd_config = cfg
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # DenoiseBatch reads the device here
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(rows, cols, cfg.vocab_size, generator=g)
        self.seconds = 0.0  # time spent inside forward, taken out of the step times

    def forward(self, ids: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        assert ctx is not None and ctx.output_positions is not None, "the sampler asks for its positions"
        out = self.logits[:ids.shape[0], :ctx.output_positions.shape[1]].contiguous()  # as a model returns
        self.seconds += time.perf_counter() - t0
        return out


def host_overhead(cfg: ModelConfig, mask_id: int, batch: int, cache: str, rounds: int, vocab: int,
                  prompt_len: int = 32, max_tokens: int = 128, block: int = 32) -> dict:
    """ms per step of DenoiseBatch.step on the stand-in (the first round is a warm-up)."""
    cfg = dataclasses.replace(cfg, vocab_size=vocab)
    model = FixedLogits(cfg, batch, block)
    per_round = []
    for r in range(rounds + 1):
        db = DenoiseBatch(model, mask_id, capacity=batch)
        g = torch.Generator().manual_seed(r)
        for i in range(batch):
            prompt = torch.randint(mask_id + 1, cfg.vocab_size, (prompt_len,), generator=g).tolist()
            params = SamplingParams(max_tokens=max_tokens, block_length=block, cache=cache, seed=i)
            db.add(prompt, plan(params, prompt_len, cfg.context_len), handle=i)
        steps, model.seconds = 0, 0.0
        t0 = time.perf_counter()
        while len(db):
            db.step()
            steps += 1
        elapsed = time.perf_counter() - t0 - model.seconds
        if r:
            per_round.append(elapsed / steps * 1e3)
    return {"batch": batch, "cache": cache, "vocab": vocab, "steps": steps, "ms_per_step": statistics.median(per_round),
            "ms_per_step_min": min(per_round), "rounds": rounds}


def mixed_lengths(checkpoint: str, dtype: str, n: int, max_tokens: int, lo: int, hi: int, rounds: int) -> dict:
    """tokens/s of `n` requests with prompt lengths uniform in [lo, hi] vs `n` of their mean length."""
    rt = load_runtime(checkpoint, "cpu", dtype)
    loaded = rt.loaded
    rng = random.Random(0)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    mean = round(statistics.mean(lengths))
    source = held_out_prompts(loaded, n, hi)
    mixed = [s[:k] for s, k in zip(source, lengths, strict=True)]
    equal = [s[:mean] for s in source]
    params = [SamplingParams(max_tokens=max_tokens, seed=i) for i in range(n)]  # steps = max_tokens, block 32

    def tokens_per_s(prompts: list[list[int]]) -> float:
        best = 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            with inference(rt):  # no eos_id: every request runs its max_tokens, so both sides do equal work
                out = generate(loaded.model, prompts, params[:len(prompts)], loaded.mask_id)
            best = max(best, sum(len(o.tokens) for o in out) / (time.perf_counter() - t0))
        return best

    tokens_per_s(equal[:2])  # warm-up
    mixed_tps, equal_tps = tokens_per_s(mixed), tokens_per_s(equal)
    return {"requests": n, "max_tokens": max_tokens, "prompt_lengths": lengths, "mean_length": mean,
            "dtype": rt.dtype_name, "rounds": rounds, "mixed_tokens_per_s": mixed_tps,
            "equal_tokens_per_s": equal_tps, "ratio": mixed_tps / equal_tps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="models/shakespeare-small")
    ap.add_argument("--dtype", default="auto", help="of the mixed-lengths run, as the server's --dtype")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per host-overhead setting (median)")
    ap.add_argument("--mixed-rounds", type=int, default=1, help="timed rounds per mixed-lengths side (best)")
    ap.add_argument("--vocab", default="4096,256", help="stand-in vocabularies: the default model's, and the "
                                                         "issue's outside measure (a vocab-256 model)")
    ap.add_argument("--skip-mixed", action="store_true", help="host overhead only")
    ap.add_argument("--label", default="after", help="key of this run in the JSON (before / after)")
    ap.add_argument("--out", default="bench/results/engine.json")
    ap.add_argument("--note", default="", help="how the run was made (alone, beside what), kept in the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_checkpoint(args.checkpoint, device="cpu")
    cfg = model_config(loaded.model)
    vocabs = [int(v) for v in args.vocab.split(",")]
    rows = [host_overhead(cfg, loaded.mask_id, b, c, args.rounds, v)
            for v in vocabs for c in ("none", "dual") for b in (1, 16)]
    print("host overhead per step (stand-in model, 128 tokens, block 32)")
    print(f"{'vocab':>6} {'cache':>6} {'batch':>5} {'ms/step':>8} {'min':>8}")
    for r in rows:
        print(f"{r['vocab']:>6} {r['cache']:>6} {r['batch']:>5} {r['ms_per_step']:>8.3f} {r['ms_per_step_min']:>8.3f}")
    result: dict = {"host_overhead": rows}
    if not args.skip_mixed:
        mix = mixed_lengths(args.checkpoint, args.dtype, 16, 64, 16, 256, args.mixed_rounds)
        print(f"mixed lengths: {mix['mixed_tokens_per_s']:.1f} tok/s vs {mix['equal_tokens_per_s']:.1f} tok/s at "
              f"the mean length {mix['mean_length']}: ratio {mix['ratio']:.3f}")
        result["mixed_lengths"] = mix
    result["env"] = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                     "machine": platform.machine(), "note": args.note,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[args.label] = {**merged.get(args.label, {}), **result}  # a --skip-mixed run keeps the mixed figures
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {out} [{args.label}]")


if __name__ == "__main__":
    main()
