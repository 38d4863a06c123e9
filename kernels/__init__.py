"""Kernels used by the models: fused RoPE and bidirectional attention.

Dispatch: CUDA tensors go to the Triton kernels when triton is importable, everything else to the
torch references (kernels.reference). TZD_KERNELS=torch|triton forces one; forced triton on CPU
tensors needs TRITON_INTERPRET=1. Calls the Triton kernels do not cover always take the reference:
causal attention, attention that needs gradients (there is no Triton attention backward: training
runs attention forward and backward in torch), head dims outside 16/32/64/128, other dtypes.
triton is imported on first use only, so `import kernels` stays cheap.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from kernels import invariant as batch_invariant
from kernels import reference
from kernels.reference import rope_cache

__all__ = ["rope", "attention", "rope_cache", "kernel_mode"]

_ENV = "TZD_KERNELS"


def kernel_mode() -> str:
    """'auto' (unset), 'torch' or 'triton', from the TZD_KERNELS environment variable."""
    mode = os.environ.get(_ENV, "").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{_ENV}={os.environ[_ENV]!r}: must be 'torch' or 'triton' (unset: Triton on CUDA)")
    return mode


@functools.cache
def _triton() -> tuple[ModuleType, ModuleType] | None:
    """(triton_rope, triton_attention), or None when triton is not installed."""
    try:
        from kernels import triton_attention, triton_rope
    except ImportError:
        return None
    return triton_rope, triton_attention


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False, q_blocks: torch.Tensor | None = None,
              k_blocks: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              invariant: bool = False) -> torch.Tensor:
    """Attention on q [B,H,T,D], k/v [B,Hk,S,D] (GQA when Hk divides H); keys >= seqlens[b] masked.

    Block-causal with q_blocks [B,T] / k_blocks [B,S] (query i sees key j iff k_blocks[b,j] <=
    q_blocks[b,i]); `mask` [B,1,T,S] for any other layout (the torch reference only).

    `invariant`: a row's output independent of the rest of its batch (its padding, the longest row,
    the mask or not): the Triton kernel with one fixed tile where it applies, else kernels.invariant.

    The Triton path is forward only: with gradients enabled and any input requiring grad, this
    runs the torch reference (SDPA) for forward and backward.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not causal and mask is None and q_blocks is None and not needs_grad and _use_triton(q):
        triton_attention = _triton()[1]
        if (q.shape[-1] in triton_attention.SUPPORTED_HEAD_DIMS and q.dtype == k.dtype == v.dtype
                and q.dtype in triton_attention.SUPPORTED_DTYPES):
            return triton_attention.attention(q, k, v, seqlens, scale, invariant=invariant)
    if invariant:
        return batch_invariant.attention(q, k, v, seqlens, scale, causal, q_blocks, k_blocks, mask)
    return reference.attention(q, k, v, seqlens, scale, causal, q_blocks, k_blocks, mask)
