"""Benchmark the Triton kernels on CUDA: a table on stdout and JSON.

RoPE (q and k together) against litgpt's apply_rope and the torch reference; attention against
SDPA's flash and efficient backends at equal lengths, and against padded SDPA with a key mask on
mixed-length batches (lengths uniform in [S/8, S]); block-causal attention against the same kernel
bidirectional and SDPA with the block mask (a full forward and a sampler window of one block against
the whole sequence); packed (varlen) attention against padding the same rows (lengths uniform in
[16, 256], batch 16): the Triton kernel on [B,H,max,D] with seqlens and padded SDPA with a key mask.
Times are medians of triton.testing.do_bench after warm-up (and after autotuning). Inputs are bf16.
Without CUDA it exits with status 2 and says so (there is no CPU part: the CPU path is the reference).

    python bench/kernels.py [--out bench/results/kernels.json] [--quick] [--sections attention_varlen,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)  # `import kernels` must find the package, not this script
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.bfloat16
TARGETS = {"rope_vs_litgpt": 2.0, "attention_vs_sdpa_flash": 0.9, "attention_vs_padded_sdpa": 1.5}


def _bench(fn) -> dict[str, float]:
    """Median and 20/80% quantiles in ms, after a call that triggers compilation and autotuning."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    med, lo, hi = triton.testing.do_bench(fn, warmup=50, rep=200, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "ms_p20": lo, "ms_p80": hi}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- RoPE ------------------------------------------------------------------------------------------


def default_model_config():
    """The default model's architecture: its checkpoint's config.json, else the trainer's experiment config."""
    from tzd.models import ModelConfig

    ckpt = ROOT / "models" / "shakespeare-small" / "config.json"
    if ckpt.is_file():
        return ModelConfig.from_dict(json.loads(ckpt.read_text())["model"])
    import yaml

    conf = ROOT / "trainer" / "conf"
    d = yaml.safe_load((conf / "model" / "smdm.yaml").read_text())
    d.update(yaml.safe_load((conf / "experiment" / "shakespeare-small.yaml").read_text()).get("model", {}))
    return ModelConfig.from_dict(d)


def rope_shapes(quick: bool) -> list[dict]:
    cfg = default_model_config()
    # A serving batch of 32 full-context rows of the default model.
    shapes = [dict(name="default", B=32, T=cfg.context_len, H=cfg.n_head, Hk=cfg.n_kv_head, D=cfg.head_dim,
                   R=cfg.rotary_dim)]
    # 1B class: TinyLlama-1.1B's attention (32 query heads, 4 KV heads, head dim 64), 2K context.
    shapes.append(dict(name="1b", B=4, T=2048, H=32, Hk=4, D=64, R=64))
    if not quick:
        shapes.append(dict(name="1b-partial", B=4, T=2048, H=32, Hk=4, D=64, R=32))
    return shapes


def bench_rope(shape: dict) -> dict:
    from litgpt.model import apply_rope

    from kernels import reference, triton_rope

    B, T, H, Hk, D, R = (shape[k] for k in ("B", "T", "H", "Hk", "D", "R"))
    # q and k as views of one fused projection, as the models produce them.
    qkv = torch.randn(B, T, H + 2 * Hk, D, device=DEVICE, dtype=DTYPE)
    q, k = qkv[:, :, :H], qkv[:, :, H:H + Hk]
    cos, sin = reference.rope_cache(T, R, device=DEVICE)
    # litgpt's own layout: [B,H,T,D] views and a [1,T,R] cache with duplicated halves.
    cos_l, sin_l = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]

    def litgpt_rope():
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        qr, kr = apply_rope(qt[..., :R], cos_l, sin_l), apply_rope(kt[..., :R], cos_l, sin_l)
        if R < D:
            qr, kr = torch.cat((qr, qt[..., R:]), -1), torch.cat((kr, kt[..., R:]), -1)
        return qr, kr

    ours = triton_rope.rope_fwd(q, k, cos, sin)
    ref = reference.rope(q, k, cos, sin)
    lit = litgpt_rope()
    row = dict(shape, dtype=str(DTYPE),
               max_diff_vs_reference=max(_max_diff(ours[0], ref[0]), _max_diff(ours[1], ref[1])),
               max_diff_vs_litgpt=max(_max_diff(ours[0], lit[0].transpose(1, 2)),
                                      _max_diff(ours[1], lit[1].transpose(1, 2))))
    row["triton"] = _bench(lambda: triton_rope.rope_fwd(q, k, cos, sin))
    row["litgpt"] = _bench(litgpt_rope)
    row["torch_reference"] = _bench(lambda: reference.rope(q, k, cos, sin))
    moved = 2 * (q.numel() + k.numel()) * q.element_size()  # read once, written once
    row["triton_GBps"] = moved / row["triton"]["ms"] / 1e6
    row["speedup_vs_litgpt"] = row["litgpt"]["ms"] / row["triton"]["ms"]
    row["speedup_vs_reference"] = row["torch_reference"]["ms"] / row["triton"]["ms"]
    return row


# ---- attention -------------------------------------------------------------------------------------


def attention_shapes(quick: bool) -> list[dict]:
    cfg = default_model_config()
    shapes = [
        dict(name="default", B=32, H=cfg.n_head, Hk=cfg.n_kv_head, S=cfg.context_len, D=cfg.head_dim),
        dict(name="1b-2k", B=4, H=32, Hk=32, S=2048, D=64),
        dict(name="d128-4k", B=2, H=16, Hk=16, S=4096, D=128),
    ]
    if not quick:
        shapes += [dict(name="d64-1k", B=16, H=16, Hk=16, S=1024, D=64),
                   dict(name="d128-2k", B=4, H=16, Hk=16, S=2048, D=128),
                   dict(name="1b-gqa-2k", B=4, H=32, Hk=4, S=2048, D=64)]
    return shapes


def _flops(B: int, H: int, T: int, keys: int, D: int) -> float:
    """Matmul FLOPs of attention forward: q k^T and p v, 2*D each per (query, key) pair."""
    return 4.0 * B * H * T * keys * D


def _sdpa(backend, q, k, v, mask=None):
    from torch.nn.attention import sdpa_kernel

    gqa = k.shape[1] != q.shape[1]

    def run():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def timed():
        if backend is None:
            return run(), _bench(run)
        with sdpa_kernel(backend):
            return run(), _bench(run)

    try:
        return timed()
    except RuntimeError as e:  # a backend that does not take these inputs (e.g. GQA, a mask)
        return None, {"error": str(e).splitlines()[0][:200]}


def bench_attention_equal(shape: dict) -> dict:
    from torch.nn.attention import SDPBackend

    from kernels import triton_attention

    B, H, Hk, S, D = (shape[k] for k in ("B", "H", "Hk", "S", "D"))
    q = torch.randn(B, H, S, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, Hk, S, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(B, Hk, S, D, device=DEVICE, dtype=DTYPE)
    row = dict(shape, T=S, dtype=str(DTYPE))
    ours = triton_attention.attention(q, k, v)
    row["triton"] = _bench(lambda: triton_attention.attention(q, k, v))
    flops = _flops(B, H, S, S, D)
    row["triton_TFLOPs"] = flops / row["triton"]["ms"] / 1e9
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        out, timing = _sdpa(backend, q, k, v)
        row[name] = timing
        if out is not None:
            row[f"max_diff_vs_{name}"] = _max_diff(ours, out)
            row[f"speedup_vs_{name}"] = timing["ms"] / row["triton"]["ms"]
    return row


def bench_attention_mixed(shape: dict, seed: int = 0) -> dict:
    from kernels import triton_attention

    B, H, Hk, S, D = (shape[k] for k in ("B", "H", "Hk", "S", "D"))
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(S // 8, S + 1, (B,), generator=gen)
    seqlens = lengths.to(DEVICE, torch.int32)
    q = torch.randn(B, H, S, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, Hk, S, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(B, Hk, S, D, device=DEVICE, dtype=DTYPE)
    mask = (torch.arange(S, device=DEVICE)[None, :] < seqlens[:, None])[:, None, None, :]
    row = dict(shape, T=S, dtype=str(DTYPE), lengths=lengths.tolist(),
               real_key_fraction=lengths.sum().item() / (B * S))
    ours = triton_attention.attention(q, k, v, seqlens)
    row["triton"] = _bench(lambda: triton_attention.attention(q, k, v, seqlens))
    row["triton_TFLOPs_real"] = _flops(1, H, S, lengths.sum().item(), D) / row["triton"]["ms"] / 1e9
    row["triton_unmasked"] = _bench(lambda: triton_attention.attention(q, k, v))
    out, timing = _sdpa(None, q, k, v, mask)  # SDPA picks its backend for a masked call
    row["padded_sdpa"] = timing
    if out is not None:
        row["max_diff_vs_padded_sdpa"] = _max_diff(ours, out)
        row["speedup_vs_padded_sdpa"] = timing["ms"] / row["triton"]["ms"]
    return row


# ---- block-causal attention ------------------------------------------------------------------------


def block_causal_shapes(quick: bool) -> list[dict]:
    cfg = default_model_config()
    d = dict(H=cfg.n_head, Hk=cfg.n_kv_head, D=cfg.head_dim, block=32, prompt=cfg.context_len // 4)
    shapes = [dict(name="default", B=32, T=cfg.context_len, S=cfg.context_len, **d),
              dict(name="default-win", B=32, T=32, S=cfg.context_len, **d)]  # the last block against all keys
    if not quick:
        shapes.append(dict(name="1b-gqa-2k", B=4, H=32, Hk=4, T=2048, S=2048, D=64, block=64, prompt=512))
    return shapes


def bench_block_causal(shape: dict) -> dict:
    from kernels import triton_attention
    from tzd.models.blocks import block_ids

    B, H, Hk, T, S, D = (shape[k] for k in ("B", "H", "Hk", "T", "S", "D"))
    q = torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, Hk, S, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(B, Hk, S, D, device=DEVICE, dtype=DTYPE)
    kb = block_ids(S, torch.full((B,), shape["prompt"], device=DEVICE), shape["block"])
    qb = kb[:, S - T:]  # the queries are the last T positions
    mask = kb[:, None, None, :] <= qb[:, None, :, None]
    row = dict(shape, dtype=str(DTYPE), visible_fraction=mask.float().mean().item())
    ours = triton_attention.attention(q, k, v, q_blocks=qb, k_blocks=kb)
    row["triton"] = _bench(lambda: triton_attention.attention(q, k, v, q_blocks=qb, k_blocks=kb))
    row["triton_bidirectional"] = _bench(lambda: triton_attention.attention(q, k, v))
    out, timing = _sdpa(None, q, k, v, mask)
    row["masked_sdpa"] = timing
    if out is not None:
        row["max_diff_vs_masked_sdpa"] = _max_diff(ours, out)
        row["speedup_vs_masked_sdpa"] = timing["ms"] / row["triton"]["ms"]
    row["speedup_vs_bidirectional"] = row["triton_bidirectional"]["ms"] / row["triton"]["ms"]
    return row


# ---- packed (varlen) attention ---------------------------------------------------------------------


def varlen_shapes(quick: bool) -> list[dict]:
    cfg = default_model_config()
    d = dict(B=16, min_len=16, max_len=256)
    shapes = [dict(name="default", H=cfg.n_head, Hk=cfg.n_kv_head, D=cfg.head_dim, block=None, **d),
              dict(name="default-bc32", H=cfg.n_head, Hk=cfg.n_kv_head, D=cfg.head_dim, block=32, **d)]
    if not quick:
        shapes.append(dict(name="1b-gqa", H=32, Hk=4, D=64, block=None, **d))
    return shapes


def bench_varlen(shape: dict, seed: int = 0) -> dict:
    """The same rows packed (varlen kernel) and padded to the longest (length-aware kernel, masked SDPA)."""
    from kernels import triton_attention, triton_varlen
    from tzd.models.blocks import block_ids

    B, H, Hk, D, block = (shape[k] for k in ("B", "H", "Hk", "D", "block"))
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shape["min_len"], shape["max_len"] + 1, (B,), generator=gen)
    L, N = int(lengths.max()), int(lengths.sum())
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(DEVICE, torch.int32)
    q = torch.randn(N, H, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(N, Hk, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(N, Hk, D, device=DEVICE, dtype=DTYPE)
    rows = torch.repeat_interleave(torch.arange(B, device=DEVICE), lengths.to(DEVICE))
    offs = torch.arange(N, device=DEVICE) - cu[rows]

    def padded(x):  # [N, h, D] -> [B, h, L, D], zeros past each row's length
        return x.new_zeros(B, L, *x.shape[1:]).index_put((rows, offs), x).transpose(1, 2)

    qp, kp, vp = padded(q), padded(k), padded(v)
    seqlens = lengths.to(DEVICE, torch.int32)
    blocks, pblocks = {}, {}
    mask = (torch.arange(L, device=DEVICE)[None, :] < seqlens[:, None])[:, None, None, :]
    if block is not None:  # each row: its own blocks of `block` from position 0 (the training layout)
        ids = block_ids(L, 0, block, DEVICE)[0]
        blocks = {"q_blocks": ids[offs], "k_blocks": ids[offs]}
        pblocks = {"q_blocks": ids[None].expand(B, L), "k_blocks": ids[None].expand(B, L)}
        mask = mask & (ids[None, None, None, :] <= ids[None, None, :, None])
    row = dict(shape, dtype=str(DTYPE), lengths=lengths.tolist(), tokens=N,
               real_token_fraction=N / (B * L), real_pair_fraction=(lengths.double() ** 2).sum().item() / (B * L * L))
    ours = triton_varlen.varlen_attention(q, k, v, cu, cu, L, L, **blocks)
    row["varlen"] = _bench(lambda: triton_varlen.varlen_attention(q, k, v, cu, cu, L, L, **blocks))
    pairs = (lengths.double() ** 2).sum().item()
    row["varlen_TFLOPs_real"] = 4.0 * H * pairs * D / row["varlen"]["ms"] / 1e9
    padded_out = triton_attention.attention(qp, kp, vp, seqlens, **pblocks)
    row["max_diff_vs_padded_triton"] = _max_diff(ours, padded_out.transpose(1, 2)[rows, offs])
    row["padded_triton"] = _bench(lambda: triton_attention.attention(qp, kp, vp, seqlens, **pblocks))
    row["speedup_vs_padded_triton"] = row["padded_triton"]["ms"] / row["varlen"]["ms"]
    out, timing = _sdpa(None, qp, kp, vp, mask)
    row["padded_sdpa"] = timing
    if out is not None:
        row["max_diff_vs_padded_sdpa"] = _max_diff(ours, out.transpose(1, 2)[rows, offs])
        row["speedup_vs_padded_sdpa"] = timing["ms"] / row["varlen"]["ms"]
    return row


# ---- report ----------------------------------------------------------------------------------------


def _fmt(row: dict, key: str) -> str:
    t = row.get(key)
    return f"{t['ms']:.4f}" if isinstance(t, dict) and "ms" in t else "n/a"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "n/a"


def print_tables(res: dict) -> None:
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  dtype {DTYPE}  (median ms)")
    print("\nRoPE, q and k   target: >= {:.1f}x litgpt".format(TARGETS["rope_vs_litgpt"]))
    print(f"{'shape':<12}{'B,T,H,Hk,D,R':<24}{'triton':>9}{'litgpt':>9}{'torch':>9}{'vs litgpt':>11}{'GB/s':>8}")
    for r in res.get("rope", []):
        dims = ",".join(str(r[k]) for k in ("B", "T", "H", "Hk", "D", "R"))
        print(f"{r['name']:<12}{dims:<24}{_fmt(r, 'triton'):>9}{_fmt(r, 'litgpt'):>9}"
              f"{_fmt(r, 'torch_reference'):>9}{_ratio(r, 'speedup_vs_litgpt'):>11}{r['triton_GBps']:>8.0f}")
    print("\nAttention, equal lengths   target: >= {:.1f}x SDPA flash".format(TARGETS["attention_vs_sdpa_flash"]))
    print(f"{'shape':<12}{'B,H,Hk,T,D':<22}{'triton':>9}{'flash':>9}{'effic.':>9}{'vs flash':>10}{'TFLOP/s':>9}")
    for r in res.get("attention_equal", []):
        dims = ",".join(str(r[k]) for k in ("B", "H", "Hk", "T", "D"))
        print(f"{r['name']:<12}{dims:<22}{_fmt(r, 'triton'):>9}{_fmt(r, 'sdpa_flash'):>9}"
              f"{_fmt(r, 'sdpa_efficient'):>9}{_ratio(r, 'speedup_vs_sdpa_flash'):>10}{r['triton_TFLOPs']:>9.0f}")
    print("\nAttention, mixed lengths in [S/8, S]   target: >= {:.1f}x padded SDPA".format(
        TARGETS["attention_vs_padded_sdpa"]))
    print(f"{'shape':<12}{'B,H,Hk,S,D':<22}{'real':>6}{'triton':>9}{'no-len':>9}{'padded':>9}{'vs padded':>11}")
    for r in res.get("attention_mixed", []):
        dims = ",".join(str(r[k]) for k in ("B", "H", "Hk", "S", "D"))
        print(f"{r['name']:<12}{dims:<22}{r['real_key_fraction']:>6.2f}{_fmt(r, 'triton'):>9}"
              f"{_fmt(r, 'triton_unmasked'):>9}{_fmt(r, 'padded_sdpa'):>9}{_ratio(r, 'speedup_vs_padded_sdpa'):>11}")
    print("\nAttention, block-causal (queries: the last T positions)")
    print(f"{'shape':<12}{'B,H,Hk,T,S,D,blk':<24}{'seen':>6}{'triton':>9}{'bidir':>9}{'masked':>9}{'vs masked':>11}"
          f"{'vs bidir':>10}")
    for r in res.get("attention_block_causal", []):
        dims = ",".join(str(r[k]) for k in ("B", "H", "Hk", "T", "S", "D", "block"))
        print(f"{r['name']:<12}{dims:<24}{r['visible_fraction']:>6.2f}{_fmt(r, 'triton'):>9}"
              f"{_fmt(r, 'triton_bidirectional'):>9}{_fmt(r, 'masked_sdpa'):>9}"
              f"{_ratio(r, 'speedup_vs_masked_sdpa'):>11}"
              f"{_ratio(r, 'speedup_vs_bidirectional'):>10}")
    print("\nAttention, packed (varlen) vs padded, lengths in [16, 256]")
    print(f"{'shape':<14}{'B,H,Hk,D,blk':<18}{'pairs':>6}{'varlen':>9}{'pad-trit':>9}{'pad-sdpa':>9}{'vs p-trit':>10}"
          f"{'vs p-sdpa':>10}")
    for r in res.get("attention_varlen", []):
        dims = ",".join(str(r[k]) for k in ("B", "H", "Hk", "D", "block"))
        print(f"{r['name']:<14}{dims:<18}{r['real_pair_fraction']:>6.2f}{_fmt(r, 'varlen'):>9}"
              f"{_fmt(r, 'padded_triton'):>9}{_fmt(r, 'padded_sdpa'):>9}{_ratio(r, 'speedup_vs_padded_triton'):>10}"
              f"{_ratio(r, 'speedup_vs_padded_sdpa'):>10}")
    print("\nTargets (worst row):")
    for key, (target, worst) in res["targets"].items():
        status = "n/a" if worst is None else ("met" if worst >= target else "MISSED")
        shown = "n/a" if worst is None else f"{worst:.2f}x"
        print(f"  {key:<28} >= {target:.1f}x   worst {shown:<8} {status}")


def summarize_targets(res: dict) -> dict:
    def worst(rows: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return min(vals) if vals else None

    return {
        "rope_vs_litgpt": (TARGETS["rope_vs_litgpt"], worst(res.get("rope", []), "speedup_vs_litgpt")),
        "attention_vs_sdpa_flash": (TARGETS["attention_vs_sdpa_flash"],
                                    worst(res.get("attention_equal", []), "speedup_vs_sdpa_flash")),
        "attention_vs_padded_sdpa": (TARGETS["attention_vs_padded_sdpa"],
                                     worst(res.get("attention_mixed", []), "speedup_vs_padded_sdpa")),
    }


# JSON key -> (benchmark of one shape, the shapes), run in this order
SECTIONS = {
    "rope": (bench_rope, rope_shapes),
    "attention_equal": (bench_attention_equal, attention_shapes),
    "attention_mixed": (bench_attention_mixed, attention_shapes),
    "attention_block_causal": (bench_block_causal, block_causal_shapes),
    "attention_varlen": (bench_varlen, varlen_shapes),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, in this order: {','.join(SECTIONS)} (default: all)")
    args = ap.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU: torch.cuda.is_available() is False here. "
              "The kernels' CPU tests run with `pytest tests/test_kernels.py` (Triton interpreter).", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench/kernels.py times compiled kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench/kernels.py needs triton: pip install 'tzd[triton]'", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "python": platform.python_version(), "dtype": str(DTYPE),
                 "timing": "triton.testing.do_bench median, warmup 50 ms, rep 200 ms"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in sections:  # the JSON is rewritten after each section: a run cut short keeps what finished
        bench, shapes = SECTIONS[name]
        res[name] = [bench(s) for s in shapes(args.quick)]
        res["targets"] = summarize_targets(res)
        args.out.write_text(json.dumps(res, indent=1))
        print(f"{name}: {len(res[name])} shapes done", flush=True)
    print_tables(res)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
