"""Tokens/s of an LLaDA-8B-shaped model (random bf16 weights) through TZD's sampler, and its forward's MFU.

All 32 layers at LLaDA-8B's widths (d_model 4096, 32 heads, MLP 12288, vocab 126,464), built on the
meta device and initialised on the target device (no checkpoint needed). Per batch size: the LLaDA
baseline (cache none, one step per token) and the dual cache, 256 tokens in blocks of 32, after an
untimed pass per shape. MFU: one whole-canvas forward at batch 16, its matmul FLOPs over the time,
against the device's dense bf16 peak (--peak-tflops; an H200/H100 SXM is 989).
Published anchor: Fast-dLLM reports its LLaDA baseline at 6.7 tokens/s on an A100 at batch 1, its best
setting at 54.

    python -m bench.family_speed --device cuda --out bench/results/gpu/llada8b.json
    python -m bench.family_speed --device cpu --layers 1 --width 256 --heads 4 --mlp 512 --batches 1 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tzd.models import ModelConfig, build_model
from tzd.sampling import SamplingParams, generate


def mask_id(vocab: int) -> int:
    """LLaDA's mask id (126336 = 126464 - 128) at its vocabulary, the same place from the end at others."""
    return vocab - 128 if vocab > 128 else vocab - 1


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    cfg = ModelConfig(backend="smdm", vocab_size=args.vocab, context_len=args.prompt + args.tokens,
                      n_layer=args.layers, n_head=args.heads, n_embd=args.width, intermediate_size=args.mlp,
                      rope_base=500000.0)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.init_rope(device)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tokens_per_s(model: torch.nn.Module, batch: int, params: SamplingParams, args: argparse.Namespace,
                 device: torch.device) -> dict[str, float]:
    g = torch.Generator().manual_seed(batch)
    mask = mask_id(args.vocab)
    prompts = torch.randint(0, mask, (batch, args.prompt), generator=g).tolist()
    with torch.inference_mode():
        generate(model, prompts, params, mask)  # untimed: kernels compile and autotune per shape
        sync(device)
        t0 = time.perf_counter()
        results = generate(model, prompts, params, mask)
        sync(device)
    secs = time.perf_counter() - t0
    steps = max(r.steps for r in results)
    return {"tokens_per_s": round(batch * args.tokens / secs, 2), "seconds": round(secs, 3),
            "ms_per_step": round(1000 * secs / steps, 2), "nfe": results[0].nfe}


def forward_mfu(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """One whole-canvas forward (the baseline's step) at batch 16: matmul FLOPs / time / peak."""
    B, T, C, L = 16, args.prompt + args.tokens, args.width, args.layers
    ids = torch.randint(0, mask_id(args.vocab), (B, T), device=device)
    with torch.inference_mode():
        for _ in range(2):
            model(ids)
        sync(device)
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            model(ids)
        sync(device)
    secs = (time.perf_counter() - t0) / reps
    per_token = L * (2 * (4 * C * C) + 2 * (3 * C * args.mlp)) + 2 * C * args.vocab  # q,k,v,o; MLP; head
    attention = L * 4 * T * C  # QK^T and PV, per query token
    flops = B * T * (per_token + attention)
    return {"batch": B, "tokens": T, "seconds": round(secs, 4), "tflops": round(flops / secs / 1e12, 1),
            "mfu": round(flops / secs / (args.peak_tflops * 1e12), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--mlp", type=int, default=12288)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    model = build(args, device)
    params = sum(p.numel() for p in model.parameters())
    configs = {"llada baseline": SamplingParams(max_tokens=args.tokens, steps=args.tokens, block_length=args.block),
               "dual cache": SamplingParams(max_tokens=args.tokens, steps=args.tokens, block_length=args.block,
                                            cache="dual"),
               "threshold 0.9 + dual": SamplingParams(max_tokens=args.tokens, steps=args.tokens,
                                                      block_length=args.block, cache="dual", threshold=0.9)}
    result: dict = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                    "params": params, "prompt": args.prompt, "tokens": args.tokens, "block": args.block, "rows": []}
    print(f"{params / 1e9:.2f}B params on {result['device']}")
    for batch in [int(b) for b in args.batches.split(",")]:
        for name, p in configs.items():
            row = {"config": name, "batch": batch, **tokens_per_s(model, batch, p, args, device)}
            result["rows"].append(row)
            print(f"batch {batch:3d}  {name:22s} {row['tokens_per_s']:9.1f} tok/s  {row['ms_per_step']:8.2f} ms/step")
    result["forward"] = forward_mfu(model, args, device)
    print(f"forward at batch 16 x {result['forward']['tokens']} tokens: {result['forward']['tflops']} TFLOP/s, "
          f"MFU {result['forward']['mfu']:.1%}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
