"""Length-aware flash attention forward in Triton: bidirectional or block-causal.

One program owns BLOCK_M queries of one (batch, head). It streams the keys/values of its KV head
(GQA: query head h reads KV head h // (H // Hk)) through SRAM in BLOCK_N tiles with an online
softmax, and stops at seqlens[b]: key tiles wholly past a row's length are never loaded, so a
mixed-length batch costs its real keys, not its padding. Only the last, partial tile is masked.

Block-causal (query i sees key j iff k_blocks[j] <= q_blocks[i], k_blocks non-decreasing) is the
same loop with a per-query key limit: with sorted key blocks the keys query i sees are exactly the
first limit[i] = searchsorted(k_blocks, q_blocks[i], right) of them (kernels.block_limits, one small
torch op per call, seqlens folded in). A query tile runs unmasked up to its smallest limit, masked
up to its largest, and never touches the key tiles past that: the tiles above the block diagonal
(smallest key block > the tile's largest query block) cost neither loads nor math.

Forward only: there is no backward here (the dispatcher sends calls that need gradients to the
torch reference).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels.block_limits import key_limits

__all__ = ["attention", "attend_tiles", "tile_configs", "prune_tiles", "INTERPRET", "LOG2E", "SUPPORTED_DTYPES",
           "SUPPORTED_HEAD_DIMS"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRET = _interpreting()  # read once: triton.jit decides at import time too
# TZD_AUTOTUNE=0: one fixed config and no search (read at import). For kernel test runs on a GPU, where every
# new (shape bucket, head dim, dtype) would otherwise compile and time each config (bench/gpu_check.sh).
AUTOTUNE = os.environ.get("TZD_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")

# (BLOCK_M, BLOCK_N, num_stages, num_warps). H100-class search space (SM90, 228 KB SMEM): the tiles and
# pipeline depths FA2-style forwards use, then small tiles for the default model's shapes (head dim 64,
# 4 heads): a sampler window of 32-64 queries, packed rows of 16-256 tokens, where a 128-row query tile
# is mostly padding and the grid has too few programs to fill the SMs.
TILE_SHAPES = [(128, 64, 3, 4), (128, 64, 3, 8), (128, 64, 4, 8), (128, 128, 3, 8), (128, 32, 4, 4),
               (64, 64, 3, 4), (64, 64, 4, 4), (64, 128, 3, 4), (64, 32, 4, 4),
               (32, 64, 3, 4), (32, 32, 3, 2), (16, 64, 2, 2)]
SMALL_TILE_MAX_BUCKET = 512  # query tiles under 64 rows compete only for query lengths up to this


def tile_configs() -> list[triton.Config]:
    if INTERPRET:
        # The interpreter cannot autotune over several configs; small tiles exercise the tile loop.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in TILE_SHAPES]


# The batch-invariant mode's one tile: every query length gets it (an FA2-style H100 tile that fits
# head dims up to 128).
INVARIANT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def prune_tiles(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Query tiles taller than the (bucketed) query length only waste work: drop them. Tiles under 64
    rows are tried only for short queries: on long ones they lose and would only add autotuning time."""
    bucket = named_args["T_BUCKET"]
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, bucket)
           and (c.kwargs["BLOCK_M"] >= 64 or bucket <= SMALL_TILE_MAX_BUCKET)]
    return fit or configs


@triton.jit
def _attn_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, kv_end, q_lim, stride_kn, stride_vn, qk_scale,
               offs_n, MASKED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one BLOCK_N tile of keys/values into the running (acc, l, m) of the online softmax.

    Unmasked tiles are wholly visible to every query of the tile. A masked tile loads the keys below
    kv_end (the tile's largest limit) and lets query i see key j iff j < q_lim[i]."""
    if MASKED:
        offs = start_n + offs_n
        kmask = offs < kv_end
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kmask[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn)
        v = tl.load(v_ptrs + start_n * stride_vn)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain: exp2 below
    if MASKED:
        qk = tl.where(offs[None, :] < q_lim[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = m_new
    if MASKED:  # a query that has seen no key yet keeps m = -inf: subtract 0, not -inf (-inf - -inf is NaN)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def attend_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, q_lim, q_valid, stride_kn, stride_vn, qk_scale, offs_n,
                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """All key tiles a query tile sees: keys j < q_lim[i] for query i (q_valid: the tile's real queries).

    Unmasked up to the smallest limit, masked up to the largest; key tiles past it are never loaded."""
    hi = tl.max(tl.where(q_valid, q_lim, 0), 0)
    lo = tl.min(tl.where(q_valid, q_lim, hi), 0)
    n_full = (lo // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, hi, q_lim, stride_kn, stride_vn,
                                   qk_scale, offs_n, False, DOT_F32, PRECISION)
    for start_n in range(n_full, hi, BLOCK_N):
        acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, hi, q_lim, stride_kn, stride_vn,
                                   qk_scale, offs_n, True, DOT_F32, PRECISION)
    # A query with no keys (seqlen 0, or none in its blocks) gets zeros, as SDPA gives for a fully masked row.
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


# Tuned per (query-length bucket, head dim, dtypes): the autotuner adds the dtypes to the key itself.
# HAS_KLIM is left out of the key: a block-causal call reuses the bidirectional tuning of its shape
# (one more compile, not a second search).
@triton.autotune(configs=tile_configs(), key=["T_BUCKET", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": prune_tiles})
@triton.jit
def _attn_fwd(Q, K, V, Out, SEQLENS, KLIM, qk_scale,
              sq_b, sq_h, sq_t, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_t, skl_b,
              H, T, S, GROUP, T_BUCKET,
              HEAD_DIM: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_KLIM: tl.constexpr, DOT_F32: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = offs_m < T
    if HAS_KLIM:  # block-causal: per-query key limits, seqlens already folded in
        q_lim = tl.load(KLIM + b * skl_b + offs_m, mask=q_valid, other=0)
    else:
        kv_len = S
        if HAS_SEQLENS:
            kv_len = tl.minimum(tl.load(SEQLENS + b).to(tl.int32), S)
        q_lim = tl.full([BLOCK_M], kv_len, tl.int32)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=q_valid[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_ptrs = K + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :]
    v_ptrs = V + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc = attend_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, q_lim, q_valid, sk_n, sv_n, qk_scale, offs_n,
                       DOT_F32, PRECISION, BLOCK_N)
    tl.store(Out + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=q_valid[:, None])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q [B,H,T,D], k and v [B,Hk,S,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"attention: k/v must share B and D with q and Hk must divide H; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head dim {D} not in {SUPPORTED_HEAD_DIMS}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: q, k, v must share one of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
              scale: float | None = None, out: torch.Tensor | None = None, q_blocks: torch.Tensor | None = None,
              k_blocks: torch.Tensor | None = None, invariant: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v over q [B,H,T,D], k/v [B,Hk,S,D]; keys >= seqlens[b] masked.

    Bidirectional, or block-causal with q_blocks [B,T] / k_blocks [B,S] (either may be [1,.]): query i
    sees key j iff k_blocks[b,j] <= q_blocks[b,i]; k_blocks must be non-decreasing along S (the kernel
    relies on it and does not check). Forward only (no autograd). fp32 inputs use full-precision (IEEE)
    dots, not TF32. `invariant`: one fixed tile (INVARIANT_CONFIG) instead of the autotuned one of the
    query-length bucket. A row already reduces over its own keys only (tiles past its limit are skipped),
    so with one BLOCK_N its keys are folded in the same tiles and order whatever the batch's longest row.
    """
    _check(q, k, v)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("attention: out must match q in shape and dtype, with a unit last stride")
    if B * H * T == 0:
        return out
    if seqlens is not None:
        seqlens = torch.as_tensor(seqlens, device=q.device)
        if seqlens.shape != (B,):
            raise ValueError(f"attention: seqlens must be [B]=[{B}]; got {tuple(seqlens.shape)}")
        seqlens = seqlens.contiguous()
    klim = None
    if q_blocks is not None or k_blocks is not None:
        klim = key_limits(q_blocks, k_blocks, B, T, S, seqlens)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # The interpreter's bf16 dot is wrong (numpy has no bf16): do the dots in fp32 there.
    dot_f32 = INTERPRET and q.dtype == torch.bfloat16
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel = _attn_fwd
    fixed = {}
    if invariant and not INTERPRET:  # the interpreter has one config already
        kernel, fixed = _attn_fwd.fn, INVARIANT_CONFIG
    kernel[grid](
        q, k, v, out, seqlens if seqlens is not None else q, klim if klim is not None else q, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        klim.stride(0) if klim is not None else 0,
        H, T, S, H // Hk, triton.next_power_of_2(T),
        HEAD_DIM=D, HAS_SEQLENS=seqlens is not None, HAS_KLIM=klim is not None, DOT_F32=dot_f32,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **fixed,
    )
    return out
