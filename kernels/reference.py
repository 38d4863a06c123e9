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


def _rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    # x: [B,T,H,D]; cos2 = [cos, cos], sin2 = [-sin, sin] over the R rotated dims, broadcast to [.,T,1,R].
    # x*cos2 + swap_halves(x)*sin2 is the half-split rotation, in fp32, with one rounding at the end.
    R = cos2.shape[-1]
    xr = x[..., :R].float()
    swapped = torch.cat((xr[..., R // 2:], xr[..., :R // 2]), dim=-1)
    rotated = (xr * cos2 + swapped * sin2).to(x.dtype)
    return rotated if R == x.shape[-1] else torch.cat((rotated, x[..., R:]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first R dims of q [B,T,H,D] and k [B,T,Hk,D] (NeoX half split); the rest pass through."""
    T = q.shape[1]
    c, s = (cos[:T], sin[:T]) if positions is None else (cos[positions], sin[positions])
    cos2 = torch.cat((c, c), dim=-1).unsqueeze(-2)
    sin2 = torch.cat((-s, s), dim=-1).unsqueeze(-2)
    if q.dtype != k.dtype:
        return _rotate(q, cos2, sin2), _rotate(k, cos2, sin2)
    # one rotation for both: a few large ops cost less than twice as many small ones on CPU
    qk = _rotate(torch.cat((q, k), dim=2), cos2, sin2)
    return qk.split([q.shape[2], k.shape[2]], dim=2)


def block_mask(q_blocks: torch.Tensor | None = None, k_blocks: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The [B,1,T,S] bool mask (True = attend) of block ids (key j seen by query i iff k_blocks[b,j] <=
    q_blocks[b,i]) or of an explicit mask; None when there is neither."""
    if mask is not None:
        return mask
    if q_blocks is None:
        return None
    return k_blocks[:, None, None, :] <= q_blocks[:, None, :, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False, q_blocks: torch.Tensor | None = None,
              k_blocks: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over q [B,H,T,D], k/v [B,Hk,S,D]; keys at index >= seqlens[b] are masked out.

    Bidirectional unless `causal` (used only by the autoregressive judge) or block-causal: with
    q_blocks [B,T] and k_blocks [B,S], query i sees key j iff k_blocks[b,j] <= q_blocks[b,i]; `mask`
    [B,1,T,S] (True = attend) gives any other layout. Every query must see at least one key.
    """
    mask = block_mask(q_blocks, k_blocks, mask)
    if seqlens is not None:
        S = k.shape[2]
        keep = torch.arange(S, device=k.device)[None, :] < seqlens.to(k.device)[:, None]  # [B,S]
        mask = keep[:, None, None, :] if mask is None else mask & keep[:, None, None, :]
    if causal and mask is not None:
        T, S = q.shape[2], k.shape[2]
        tri = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        mask = mask & tri
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])
