"""Torch reference implementations of the kernels: the ground truth for tests and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_cache(seq_len: int, rotary_dim: int, base: float = 10000.0,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [seq_len, rotary_dim // 2] (fp32) for NeoX half-split RoPE."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B,T,H,D]; cos/sin: [B,T,R/2] already gathered for the positions.
    half = cos.shape[-1]
    x1 = x[..., :half].float()
    x2 = x[..., half:2 * half].float()
    c = cos.unsqueeze(2)
    s = sin.unsqueeze(2)
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., 2 * half:]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first R dims of q [B,T,H,D] and k [B,T,Hk,D] (NeoX half split); the rest pass through."""
    T = q.shape[1]
    if positions is None:
        c, s = cos[:T].unsqueeze(0), sin[:T].unsqueeze(0)
    else:
        c, s = cos[positions], sin[positions]
    return _rotate(q, c, s), _rotate(k, c, s)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """Attention over q [B,H,T,D], k/v [B,Hk,S,D]; keys at index >= seqlens[b] are masked out.

    Bidirectional unless `causal` (used only by the autoregressive judge).
    """
    mask = None
    if seqlens is not None:
        S = k.shape[2]
        keep = torch.arange(S, device=k.device)[None, :] < seqlens.to(k.device)[:, None]  # [B,S]
        mask = keep[:, None, None, :]
    if causal and mask is not None:
        T, S = q.shape[2], k.shape[2]
        tri = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        mask = mask & tri
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])
