"""Packed (varlen) flash attention forward in Triton: rows of different lengths, no padding.

The flash-attn varlen layout: the queries of all rows packed into q [Nq,H,D] (row b holds tokens
cu_seqlens_q[b]:cu_seqlens_q[b+1]), keys/values likewise in k/v [Nk,Hk,D]. The grid is (query tile,
head, row) over max_seqlen_q; a program whose tile starts past its row's length exits at once, so a
batch costs the tokens it holds: no padded query is computed and no padded key is loaded. Inside a
row the loop is the padded kernel's (kernels.triton_attention.attend_tiles): bidirectional, or
block-causal through per-query key limits (kernels.block_limits).

Forward only: the dispatcher sends calls that need gradients to the torch reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.block_limits import varlen_key_limits
from kernels.reference import check_varlen
from kernels.triton_attention import (
    INTERPRET,
    LOG2E,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    attend_tiles,
    prune_tiles,
    tile_configs,
)

__all__ = ["varlen_attention", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]


# Tuned per (longest-row bucket, head dim, dtypes), as the padded kernel is per query-length bucket.
@triton.autotune(configs=tile_configs(), key=["T_BUCKET", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": prune_tiles})
@triton.jit
def _varlen_fwd(Q, K, V, Out, CU_Q, CU_K, KLIM, qk_scale,
                sq_t, sq_h, sk_n, sk_h, sv_n, sv_h, so_t, so_h, GROUP, T_BUCKET,
                HEAD_DIM: tl.constexpr, HAS_KLIM: tl.constexpr, DOT_F32: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    if start_m * BLOCK_M >= q_len:  # this row is shorter than the longest: nothing to do here
        return
    k_start = tl.load(CU_K + b)
    k_len = tl.load(CU_K + b + 1) - k_start
    hk = h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = offs_m < q_len
    q_tok = (q_start + offs_m).to(tl.int64)  # packed token index: int64, Nq * stride may pass 2**31
    if HAS_KLIM:  # packed index one past each query's last key -> a count within the row
        q_lim = tl.load(KLIM + q_tok, mask=q_valid, other=0) - k_start
    else:
        q_lim = tl.full([BLOCK_M], k_len, tl.int32)
    q = tl.load(Q + q_tok[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=q_valid[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_tok = k_start.to(tl.int64) + offs_n
    k_ptrs = K + k_tok[:, None] * sk_n + hk * sk_h + offs_d[None, :]
    v_ptrs = V + k_tok[:, None] * sv_n + hk * sv_h + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc = attend_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, q_lim, q_valid, sk_n, sv_n, qk_scale, offs_n,
                       DOT_F32, PRECISION, BLOCK_N)
    tl.store(Out + q_tok[:, None] * so_t + h * so_h + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=q_valid[:, None])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None,
                     q_blocks: torch.Tensor | None = None, k_blocks: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed attention: q [Nq,H,D], k/v [Nk,Hk,D]; row b's queries/keys are cu_seqlens_q/k[b]:[b+1].

    Bidirectional within each row, or block-causal with per-token ids q_blocks [Nq] / k_blocks [Nk] (query
    i sees key j of its row iff k_blocks[j] <= q_blocks[i]; ids in [0, 2**31), non-decreasing along each
    row's keys, not checked). max_seqlen_q must be >= every row's query count (not checked: it sizes the
    grid without a device sync; queries past it would be left unwritten); max_seqlen_k is accepted for the
    flash-attn signature and not needed here. A query with no key gets zeros. Forward only (no autograd).
    """
    check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_blocks, k_blocks)
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"varlen_attention: q, k, v must share one of {SUPPORTED_DTYPES}; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    Nq, H, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"varlen_attention: head dim {D} not in {SUPPORTED_HEAD_DIMS}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = torch.empty((Nq, H, D), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("varlen_attention: out must match q in shape and dtype, with a unit last stride")
    B = cu_seqlens_q.shape[0] - 1
    if Nq == 0 or max_seqlen_q == 0:
        return out
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    klim = varlen_key_limits(q_blocks, k_blocks, cu_q, cu_k) if q_blocks is not None else None
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dot_f32 = INTERPRET and q.dtype == torch.bfloat16  # the interpreter's bf16 dot is wrong
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), H, B)  # noqa: E731
    _varlen_fwd[grid](
        q, k, v, out, cu_q, cu_k, klim if klim is not None else cu_q, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        H // k.shape[1], triton.next_power_of_2(max_seqlen_q),
        HEAD_DIM=D, HAS_KLIM=klim is not None, DOT_F32=dot_f32,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
