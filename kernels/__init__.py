"""Kernels used by the models: fused RoPE, attention (bidirectional or block-causal), packed attention.

Dispatch: CUDA tensors go to the Triton kernels when triton is importable, everything else to the
torch references (kernels.reference). TZD_KERNELS=torch|triton forces one; forced triton on CPU
tensors needs TRITON_INTERPRET=1. Calls the Triton kernels do not cover always take the reference:
causal attention, an explicit mask, attention that needs gradients (there is no Triton attention
backward: training runs attention forward and backward in torch), head dims outside 16/32/64/128,
other dtypes. triton is imported on first use only, so `import kernels` stays cheap.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType

import torch

from kernels import invariant as batch_invariant
from kernels import reference
from kernels.reference import rope_cache

__all__ = ["rope", "attention", "varlen_attention", "rope_cache", "kernel_mode", "commit_kernel"]

_ENV = "TZD_KERNELS"


def kernel_mode() -> str:
    """'auto' (unset), 'torch' or 'triton', from the TZD_KERNELS environment variable."""
    mode = os.environ.get(_ENV, "").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{_ENV}={os.environ[_ENV]!r}: must be 'torch' or 'triton' (unset: Triton on CUDA)")
    return mode


@functools.cache
def _triton() -> tuple[ModuleType, ModuleType, ModuleType] | None:
    """(triton_rope, triton_attention, triton_varlen), or None when triton is not installed."""
    try:
        from kernels import triton_attention, triton_rope, triton_varlen
    except ImportError:
        return None
    return triton_rope, triton_attention, triton_varlen


def _use_triton(x: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "torch" or (mode == "auto" and not x.is_cuda):
        return False
    if _triton() is None:
        if mode == "triton":
            raise RuntimeError(f"{_ENV}=triton but triton is not importable: pip install 'tzd[triton]'")
        return False
    return True


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX RoPE on q [B,T,H,D] and k [B,T,Hk,D]; cos/sin [S, R//2]; positions [B,T] or None (0..T-1)."""
    if _use_triton(q):
        triton_rope = _triton()[0]
        if q.dtype == k.dtype and q.dtype in triton_rope.SUPPORTED_DTYPES:
            return triton_rope.rope(q, k, cos, sin, positions)
    return reference.rope(q, k, cos, sin, positions)


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _kernel_takes(module: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.shape[-1] in module.SUPPORTED_HEAD_DIMS and q.dtype == k.dtype == v.dtype
            and q.dtype in module.SUPPORTED_DTYPES)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False, q_blocks: torch.Tensor | None = None,
              k_blocks: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              invariant: bool = False) -> torch.Tensor:
    """Attention on q [B,H,T,D], k/v [B,Hk,S,D] (GQA when Hk divides H); keys >= seqlens[b] masked.

    Block-causal with q_blocks [B,T] / k_blocks [B,S] (query i sees key j iff k_blocks[b,j] <=
    q_blocks[b,i]; the Triton kernel needs k_blocks non-decreasing along S, as block layouts are);
    `mask` [B,1,T,S] for any other layout (the torch reference only).

    `invariant`: a row's output independent of the rest of its batch (its padding, the longest row,
    the mask or not): the Triton kernel with one fixed tile where it applies, else kernels.invariant.

    The Triton path is forward only: with gradients enabled and any input requiring grad, this
    runs the torch reference (SDPA) for forward and backward.
    """
    if (q_blocks is None) != (k_blocks is None):
        raise ValueError("attention: q_blocks and k_blocks go together (one was None)")
    if not causal and mask is None and not _needs_grad(q, k, v) and _use_triton(q):
        triton_attention = _triton()[1]
        if _kernel_takes(triton_attention, q, k, v):
            return triton_attention.attention(q, k, v, seqlens, scale, q_blocks=q_blocks, k_blocks=k_blocks,
                                              invariant=invariant)
    if invariant:
        return batch_invariant.attention(q, k, v, seqlens, scale, causal, q_blocks, k_blocks, mask)
    return reference.attention(q, k, v, seqlens, scale, causal, q_blocks, k_blocks, mask)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None,
                     q_blocks: torch.Tensor | None = None, k_blocks: torch.Tensor | None = None,
                     invariant: bool = False) -> torch.Tensor:
    """Packed attention (flash-attn's varlen layout): q [Nq,H,D], k/v [Nk,Hk,D] -> [Nq,H,D].

    Row b's queries are q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] and its keys/values the same slice of k/v
    by cu_seqlens_k ([B+1] int32, from 0; empty rows allowed); max_seqlen_q/k are the longest row's
    counts (ints, so the Triton path needs no device sync). Bidirectional within each row, or
    block-causal with per-token block ids q_blocks [Nq] / k_blocks [Nk] (ids >= 0, non-decreasing
    along each row's keys). A query that sees no key gets zeros. Forward only on the Triton path, as
    `attention`; the torch reference (padded SDPA) takes gradients. `invariant` (deterministic mode):
    the reference over kernels.invariant's attention, on every device.
    """
    if invariant:
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                          q_blocks, k_blocks, attend=batch_invariant.attention)
    if not _needs_grad(q, k, v) and _use_triton(q):
        triton_varlen = _triton()[2]
        if _kernel_takes(triton_varlen, q, k, v):
            return triton_varlen.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  scale, q_blocks, k_blocks)
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                      q_blocks, k_blocks)


def commit_kernel(x: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The sampler's commit choice in one Triton launch (kernels.triton_commit.select_commits) where tensors
    like `x` take the Triton kernels, else None: the caller keeps its torch rule (tzd.sampling.rules)."""
    if not _use_triton(x):
        return None
    from kernels import triton_commit  # noqa: PLC0415 - triton only where it runs

    return triton_commit.select_commits
