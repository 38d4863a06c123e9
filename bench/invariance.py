"""Batch invariance of the default model: where a row's logits start to depend on its batch, and what
the invariant path costs.

  python -m bench.invariance [--precisions fp32,bf16-autocast] [--repeats 3] [--out bench/results/invariance.json]

For each precision (fp32; bf16-autocast = the CPU serving default where the CPU has bf16 units:
linear layers stored in bf16 under bf16 autocast), with the invariant path off and on:
- probe: one forward of a row alone vs the same row inside a batch of mixed lengths (padding,
  key-length masks), compared bit for bit after every module and the attention core; the first
  modules that differ are the ops that break invariance (later ones only inherit the difference);
- requests: 16 requests at temperature 0 with mixed prompt lengths and params (steps, block length,
  max_tokens, threshold, cache modes) through generate() at batch 16 vs one at a time: how many
  get the same tokens;
- cost: tokens/s of those 16 requests through generate() at batch 16, off and on alternately,
  median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import kernels
from tzd.checkpoint import load_checkpoint
from tzd.models import ForwardContext
from tzd.models.invariant import set_batch_invariant
from tzd.sampling import SamplingParams, generate

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16-autocast")


def mixed_requests(tokenizer, n: int = 16, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """n prompts of 4-120 tokens (README text) with mixed steps, block lengths, lengths, thresholds, caches."""
    rng = random.Random(seed)
    words = (ROOT / "README.md").read_text().split()
    prompts, params = [], []
    for i in range(n):
        k = rng.randint(3, 60)
        s = rng.randint(0, len(words) - k)
        prompts.append(tokenizer.encode(" ".join(words[s:s + k]))[:rng.randint(4, 120)])
        max_tokens = rng.choice([16, 24, 32, 48])
        block = rng.choice([b for b in (8, 16, 32) if b <= max_tokens])
        steps = rng.randint(-(-max_tokens // block), max_tokens)
        params.append(SamplingParams(max_tokens=max_tokens, steps=steps, block_length=block, temperature=0.0,
                                     threshold=rng.choice([None, None, 0.9]), cache=("none", "prefix", "dual")[i % 3]))
    return prompts, params


def probe(model: torch.nn.Module, lengths: list[int], vocab: int) -> list[str]:
    """Modules (and 'attention core') whose output for row 0 differs alone vs in the batch, in call order."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=g)
    outputs: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        return lambda mod, inp, out: outputs.setdefault(name, []).append(out.detach().clone())

    hooks = [mod.register_forward_hook(record(name)) for name, mod in model.named_modules()
             if name and not isinstance(mod, torch.nn.ModuleList)]
    real = kernels.attention

    def attention(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.setdefault("attention core", []).append(out.detach().clone())
        return out

    kernels.attention = attention
    try:
        model(ids[:1, :lengths[0]])
        alone, outputs = outputs, {}
        model(ids, ForwardContext(seqlens=torch.tensor(lengths)))
        batched = outputs
    finally:
        kernels.attention = real
        for h in hooks:
            h.remove()
    differ = []
    for name, outs in alone.items():
        for a, b in zip(outs, batched[name], strict=True):
            b = b[:1, :, :lengths[0]] if a.dim() == 4 else b[:1, :lengths[0]]
            if not torch.equal(a, b):
                differ.append(f"{name} (max |diff| {(a.float() - b.float()).abs().max().item():.3g})")
                break
    return differ


def tokens_per_s(model, prompts, params, mask_id: int, eos: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    results = generate(model, prompts, params, mask_id, eos_id=eos)
    dt = time.perf_counter() - t0
    return sum(len(r.tokens) for r in results) / dt, [r.tokens for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "models/shakespeare-small"))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/invariance.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"checkpoint": args.checkpoint, "threads": args.threads, "torch": torch.__version__,
                    "requests": 16, "precisions": {}}
    for precision in args.precisions.split(","):
        if precision not in PRECISIONS:
            raise SystemExit(f"--precisions: {precision!r} is not one of {', '.join(PRECISIONS)}")
        bf16 = precision == "bf16-autocast"
        loaded = load_checkpoint(args.checkpoint, device="cpu", dtype=torch.float32,
                                 linear_dtype=torch.bfloat16 if bf16 else None)
        model, mask_id, eos = loaded.model, loaded.mask_id, loaded.special.eos
        prompts, params = mixed_requests(loaded.tokenizer)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        res: dict = {}
        with torch.inference_mode(), autocast:
            for invariant in (False, True):
                set_batch_invariant(model, invariant)
                key = "invariant" if invariant else "default"
                differ = probe(model, [44, 101, 68, 22, 106], loaded.model_config.vocab_size)
                _, together = tokens_per_s(model, prompts, params, mask_id, eos)
                alone = [generate(model, [p], q, mask_id, eos_id=eos)[0].tokens for p, q in zip(prompts, params,
                                                                                              strict=True)]
                same = sum(a == b for a, b in zip(together, alone, strict=True))
                res[key] = {"first_ops_that_differ": differ[:4], "modules_that_differ": len(differ),
                            "requests_same_as_alone": same, "tokens_per_s": []}
                print(f"{precision:14s} {key:9s}: {same}/16 requests same as alone; first ops that differ: "
                      f"{', '.join(differ[:3]) or 'none'}")
            for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
                for invariant in (False, True):
                    set_batch_invariant(model, invariant)
                    tps, _ = tokens_per_s(model, prompts, params, mask_id, eos)
                    res["invariant" if invariant else "default"]["tokens_per_s"].append(round(tps, 1))
        for key in ("default", "invariant"):
            res[key]["tokens_per_s_median"] = statistics.median(res[key]["tokens_per_s"])
        res["invariant_over_default"] = round(res["invariant"]["tokens_per_s_median"]
                                              / res["default"]["tokens_per_s_median"], 3)
        print(f"{precision:14s} tokens/s at batch 16: default {res['default']['tokens_per_s']}, invariant "
              f"{res['invariant']['tokens_per_s']} -> {res['invariant_over_default']:.3f}x")
        report["precisions"][precision] = res
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
