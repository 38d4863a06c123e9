"""Tokens/s of an LLaDA-8B-shaped model (random bf16 weights) through TZD's sampler, and its forward's MFU.

All 32 layers at LLaDA-8B's widths (d_model 4096, 32 heads, MLP 12288, vocab 126,464), built on the
meta device and initialised on the target device (no checkpoint needed). Per batch size: the LLaDA
baseline (cache none, one step per token) and the dual cache, 256 tokens in blocks of 32, after an
untimed pass per shape. MFU: one whole-canvas forward at batch 16, its matmul FLOPs over the time,
against the device's dense bf16 peak (--peak-tflops; an H200/H100 SXM is 989).
Published anchor: Fast-dLLM reports its LLaDA baseline at 6.7 tokens/s on an A100 at batch 1, its best
setting at 54.

`--family llada2`: LLaDA2.0-mini's shape instead (hidden 2048, 16 heads of 128, 4 KV heads, vocab 157,184,
a dense first layer of 5120, then 256 experts of 512, top 8 in 4 of 8 groups, one shared expert, partial
RoPE, q/k norms; block-causal, blocks of 32 from position 0, LLaDA2's sampling rule): tokens/s and
forwards per token at each batch for its rule alone, with the exact cache, and with its default threshold
0.95; the MoE layers' share of a whole-canvas forward's time; and one MoE layer's tokens/s against a dense
SwiGLU of the same active width (top-k experts + shared expert), on the same tokens.

    python -m bench.family_speed --device cuda --out bench/results/gpu/llada8b.json
    python -m bench.family_speed --device cuda --family llada2 --out bench/results/gpu/llada2_mini.json
    python -m bench.family_speed --device cpu --layers 1 --width 256 --heads 4 --mlp 512 --batches 1 --tokens 32
    python -m bench.family_speed --device cpu --family llada2 --layers 2 --prompt 32 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tzd.models import ModelConfig, build_model
from tzd.models.moe import MoEFeedForward
from tzd.models.smdm import FeedForward
from tzd.sampling import SamplingParams, generate

LLADA2_MINI = dict(n_embd=2048, n_head=16, n_kv_head=4, head_size=128, intermediate_size=5120, vocab_size=157184,
                   n_experts=256, n_experts_per_token=8, moe_intermediate_size=512, n_shared_experts=1,
                   first_k_dense_replace=1, router_score="sigmoid", router_bias=True, n_group=8, topk_group=4,
                   norm_topk_prob=True, routed_scaling_factor=2.5, rotary_fraction=0.5, rope_base=600000.0,
                   qk_norm=True, attention="block_causal", diffusion_block=32, block_align="absolute",
                   decode_rule="llada2")
LLADA2_MASK = 156895


def mask_id(vocab: int) -> int:
    """LLaDA's mask id (126336 = 126464 - 128) at its vocabulary, the same place from the end at others;
    LLaDA2's own at its vocabulary."""
    if vocab == LLADA2_MINI["vocab_size"]:
        return LLADA2_MASK
    return vocab - 128 if vocab > 128 else vocab - 1


def model_config(args: argparse.Namespace) -> ModelConfig:
    context = -(-(args.prompt + args.tokens) // 32) * 32 + 32  # LLaDA2's canvas runs on to its block's end
    if args.family == "llada2":
        return ModelConfig(backend="smdm", context_len=context, n_layer=args.layers, **LLADA2_MINI)
    return ModelConfig(backend="smdm", vocab_size=args.vocab, context_len=context, n_layer=args.layers,
                       n_head=args.heads, n_embd=args.width, intermediate_size=args.mlp, rope_base=500000.0)


def randomised(module: torch.nn.Module, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """`module` (built on the meta device) in bf16 on `device`: norms 1, biases 0, other weights N(0, 0.02)."""
    module = module.to(torch.bfloat16).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in [*module.named_parameters(), *module.named_buffers()]:
            if not p.is_floating_point():
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):  # expert_bias too
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return module.eval().requires_grad_(False)


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(model_config(args))
    model = randomised(model, device)
    model.init_rope(device)
    return model


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
    if args.family == "llada2":
        return moe_share(model, ids, device)
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


def moe_share(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, reps: int = 3) -> dict[str, float]:
    """A whole-canvas forward's time and the part of it its MoE feed-forwards take (timed by hooks, each
    synchronised, so the total is a little slower than unhooked)."""
    spent = [0.0]
    start: dict[int, float] = {}

    def before(module: torch.nn.Module, _inputs: tuple) -> None:
        sync(device)
        start[id(module)] = time.perf_counter()

    def after(module: torch.nn.Module, _inputs: tuple, _out: torch.Tensor) -> None:
        sync(device)
        spent[0] += time.perf_counter() - start[id(module)]

    moe = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    hooks = [h for m in moe for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with torch.inference_mode():
            model(ids)
            spent[0] = 0.0
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                model(ids)
            sync(device)
    finally:
        for h in hooks:
            h.remove()
    secs = (time.perf_counter() - t0) / reps
    return {"batch": ids.shape[0], "tokens": ids.shape[1], "seconds": round(secs, 4), "moe_layers": len(moe),
            "moe_share": round(spent[0] / reps / secs, 3)}


def moe_vs_dense(args: argparse.Namespace, device: torch.device, tokens: int = 1024, reps: int = 5) -> dict:
    """One MoE feed-forward (router, top-k experts, shared expert) against a dense SwiGLU of the same active
    width, on the same `tokens` rows of random activations: tokens/s each."""
    cfg = model_config(args)
    active = cfg.n_experts_per_token * cfg.moe_intermediate_size + cfg.n_shared_experts * cfg.moe_intermediate_size
    with torch.device("meta"):
        shared = FeedForward(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
        layers = {"moe": MoEFeedForward(cfg, shared), "dense_same_active_width": FeedForward(cfg, active)}
    x = torch.randn(tokens, cfg.n_embd, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    out: dict = {"tokens": tokens, "active_width": active}
    for name, layer in layers.items():
        layer = randomised(layer, device)
        with torch.inference_mode():
            layer(x)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                layer(x)
            sync(device)
        out[f"{name}_tokens_per_s"] = round(tokens * reps / (time.perf_counter() - t0), 1)
    out["moe_over_dense"] = round(out["moe_tokens_per_s"] / out["dense_same_active_width_tokens_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--family", choices=("llada", "llada2"), default="llada",
                    help="LLaDA-8B's shape, or LLaDA2.0-mini's (mixture of experts, block diffusion)")
    ap.add_argument("--layers", type=int, default=None, help="default: the family's (32 LLaDA, 20 LLaDA2-mini)")
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
    if args.layers is None:
        args.layers = 20 if args.family == "llada2" else 32
    if args.family == "llada2":
        args.vocab = LLADA2_MINI["vocab_size"]
    device = torch.device(args.device)
    model = build(args, device)
    params = sum(p.numel() for p in model.parameters())
    configs = {"llada baseline": SamplingParams(max_tokens=args.tokens, steps=args.tokens, block_length=args.block),
               "dual cache": SamplingParams(max_tokens=args.tokens, steps=args.tokens, block_length=args.block,
                                            cache="dual"),
               "threshold 0.9 + dual": SamplingParams(max_tokens=args.tokens, steps=args.tokens,
                                                      block_length=args.block, cache="dual", threshold=0.9)}
    if args.family == "llada2":  # its rule: steps per block (32 = one token a step), blocks of 32 from 0
        configs = {"llada2 rule": SamplingParams(max_tokens=args.tokens),
                   "llada2 rule + exact cache": SamplingParams(max_tokens=args.tokens, cache="dual"),
                   "threshold 0.95 + exact cache": SamplingParams(max_tokens=args.tokens, cache="dual",
                                                                  threshold=0.95)}
    result: dict = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                    "family": args.family, "layers": args.layers, "params": params,
                    "active_params": params - model_config(args).unrouted_params(), "prompt": args.prompt,
                    "tokens": args.tokens, "block": args.block, "threads": torch.get_num_threads(), "rows": []}
    print(f"{params / 1e9:.2f}B params on {result['device']}")
    for batch in [int(b) for b in args.batches.split(",")]:
        for name, p in configs.items():
            row = {"config": name, "batch": batch, **tokens_per_s(model, batch, p, args, device)}
            row["nfe_per_token"] = round(row["nfe"] / args.tokens, 3)
            result["rows"].append(row)
            print(f"batch {batch:3d}  {name:22s} {row['tokens_per_s']:9.1f} tok/s  {row['ms_per_step']:8.2f} ms/step")
    result["forward"] = forward_mfu(model, args, device)
    if args.family == "llada2":
        f = result["forward"]
        print(f"forward at batch 16 x {f['tokens']} tokens: {f['seconds']} s, MoE layers {f['moe_share']:.0%} of it")
        result["moe_layer"] = m = moe_vs_dense(args, device)
        print(f"one MoE layer {m['moe_tokens_per_s']} tok/s vs dense SwiGLU of its active width {m['active_width']}: "
              f"{m['dense_same_active_width_tokens_per_s']} tok/s ({m['moe_over_dense']}x)")
    else:
        print(f"forward at batch 16 x {result['forward']['tokens']} tokens: {result['forward']['tflops']} TFLOP/s, "
              f"MFU {result['forward']['mfu']:.1%}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
