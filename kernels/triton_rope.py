"""Fused NeoX RoPE in Triton: one launch rotates q and k, with an autograd backward.

One program per token (b, t): it gathers cos/sin for the token's position once and rotates every
head of q and of k with them, so q and k are each read once and written once. The backward of a
rotation by theta is the rotation by -theta, so it is the same kernel with sin negated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope", "rope_fwd", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, n_heads, sx_h, so_h, c, s,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  REST: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the first 2*HALF dims of n_heads heads of one token; copy the REST dims after them."""
    offs_d = tl.arange(0, BLOCK_HALF)
    offs_r = tl.arange(0, BLOCK_REST)
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h[:, None] < n_heads
        m = hmask & (offs_d[None, :] < HALF)
        xp = x_ptr + offs_h[:, None] * sx_h + offs_d[None, :]
        op = o_ptr + offs_h[:, None] * so_h + offs_d[None, :]
        x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(op, (x1 * c[None, :] - x2 * s[None, :]).to(o_ptr.dtype.element_ty), mask=m)
        tl.store(op + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(o_ptr.dtype.element_ty), mask=m)
        if REST > 0:
            mr = hmask & (offs_r[None, :] < REST)
            rest = tl.load(x_ptr + offs_h[:, None] * sx_h + 2 * HALF + offs_r[None, :], mask=mr)
            tl.store(o_ptr + offs_h[:, None] * so_h + 2 * HALF + offs_r[None, :], rest, mask=mr)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
                 T, H, HK,
                 sq_b, sq_t, sq_h, sk_b, sk_t, sk_h,
                 sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h,
                 s_cs, sp_b, sp_t,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HAS_POS: tl.constexpr, CONJ: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64: b * stride can pass 2**31 on large batches
    b = pid // T
    t = pid % T
    if HAS_POS:
        pos = tl.load(pos_ptr + b * sp_b + t * sp_t).to(tl.int64)
    else:
        pos = t
    offs = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + pos * s_cs + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * s_cs + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    if CONJ:
        s = -s
    _rotate_heads(q_ptr + b * sq_b + t * sq_t, qo_ptr + b * sqo_b + t * sqo_t, H, sq_h, sqo_h, c, s,
                  HALF, BLOCK_HALF, REST, BLOCK_REST, BLOCK_HQ)
    _rotate_heads(k_ptr + b * sk_b + t * sk_t, ko_ptr + b * sko_b + t * sko_t, HK, sk_h, sko_h, c, s,
                  HALF, BLOCK_HALF, REST, BLOCK_REST, BLOCK_HK)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           positions: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q [B,T,H,D] and k [B,T,Hk,D] must share B, T, D; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rope: q and k must share one of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}")
    if cos.dim() != 2 or cos.shape != sin.shape or 2 * cos.shape[1] > q.shape[-1]:
        raise ValueError(f"rope: cos/sin must be [S, R//2] with R <= D={q.shape[-1]}; got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    B, T = q.shape[:2]
    if positions is None and T > cos.shape[0]:
        raise ValueError(f"rope: T={T} positions exceed the cos/sin table of {cos.shape[0]} rows")
    if positions is not None and positions.shape != (B, T):
        raise ValueError(f"rope: positions must be [B,T]=[{B},{T}]; got {tuple(positions.shape)}")


def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             positions: torch.Tensor | None = None, conj: bool = False,
             out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q [B,T,H,D] and k [B,T,Hk,D] (by -theta when `conj`), written into `out` if given.

    No autograd. Positions must lie in [0, S); they are not bounds-checked on the device.
    """
    _check(q, k, cos, sin, positions)
    q, k = _last_contiguous(q), _last_contiguous(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    qo, ko = out if out is not None else (torch.empty_like(q, memory_format=torch.contiguous_format),
                                         torch.empty_like(k, memory_format=torch.contiguous_format))
    if qo.shape != q.shape or ko.shape != k.shape or qo.stride(-1) != 1 or ko.stride(-1) != 1:
        raise ValueError("rope: out tensors must match q and k in shape, with a unit last stride")
    B, T, H, D = q.shape
    Hk = k.shape[2]
    if B * T == 0:
        return qo, ko
    half = cos.shape[1]
    rest = D - 2 * half
    if positions is not None:
        positions = positions.to(q.device)
        sp_b, sp_t = positions.stride()
    else:
        sp_b = sp_t = 0
    block_half = triton.next_power_of_2(max(half, 1))
    # Bound a head chunk to ~4K elements per tile so big heads do not spill registers.
    cap = max(1, 4096 // block_half)
    _rope_kernel[(B * T,)](
        q, k, qo, ko, cos, sin, positions if positions is not None else cos,
        T, H, Hk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), sp_b, sp_t,
        HALF=half, BLOCK_HALF=block_half, REST=rest, BLOCK_REST=triton.next_power_of_2(max(rest, 1)),
        BLOCK_HQ=min(triton.next_power_of_2(H), cap), BLOCK_HK=min(triton.next_power_of_2(Hk), cap),
        HAS_POS=positions is not None, CONJ=conj,
        num_warps=4 if H * D >= 2048 else 2,
    )
    return qo, ko


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, positions):
        ctx.save_for_backward(cos, sin, positions)
        return rope_fwd(q, k, cos, sin, positions)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, positions = ctx.saved_tensors
        dq, dk = rope_fwd(grad_q, grad_k, cos, sin, positions, conj=True)
        return dq, dk, None, None, None  # cos/sin are fixed tables: no gradient


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX RoPE of the first R=2*cos.shape[1] dims of q [B,T,H,D] and k [B,T,Hk,D]; differentiable in q, k."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RoPE.apply(q, k, cos, sin, positions)
    return rope_fwd(q, k, cos, sin, positions)
