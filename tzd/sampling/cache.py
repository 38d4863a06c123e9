"""Block KV cache (Fast-dLLM prefix and dual cache, approximate).

At a block's first step a full forward records every layer's keys/values for the whole canvas.
Inside the block, a cached forward runs only the query window (prefix: the block and everything
after it; dual: the block alone) and attends to the recorded keys/values elsewhere, with the
window's fresh keys/values written over them. Keys keep their absolute layout, so the key length
of a row is simply its canvas length.
"""

from __future__ import annotations

import torch


class KVStore:
    """Keys/values per slot: [slots, layers, Hk, context, D] each, allocated on first use."""

    def __init__(self, slots: int, layers: int, kv_heads: int, context: int, head_dim: int,
                 device: torch.device) -> None:
        self.shape = (slots, layers, kv_heads, context, head_dim)
        self.device = device
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def ensure(self, dtype: torch.dtype) -> None:
        if self.k is None or self.k.dtype != dtype:
            self.k = torch.zeros(self.shape, dtype=dtype, device=self.device)
            self.v = torch.zeros(self.shape, dtype=dtype, device=self.device)


class RecordView:
    """A full forward that also records the keys/values of `slots` (rows of the batch, in order)."""

    def __init__(self, store: KVStore, slots: torch.Tensor, seqlens: torch.Tensor) -> None:
        self.store, self.slots, self.seqlens = store, slots, seqlens

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.store.ensure(k.dtype)
        n, T = len(self.slots), k.shape[2]  # rows past n are unconditional (CFG) copies: not cached
        self.store.k[self.slots, layer, :, :T] = k[:n]
        self.store.v[self.slots, layer, :, :T] = v[:n]
        return k, v, self.seqlens


class ReadView:
    """A cached forward: queries at q_start + [0, Q) per row; keys are the recorded canvas with the
    window's fresh keys/values in place of [q_start, q_start + q_len)."""

    def __init__(self, store: KVStore, slots: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
                 seqlens: torch.Tensor) -> None:
        self.store, self.slots, self.seqlens = store, slots, seqlens
        S = int(seqlens.max())
        pos = torch.arange(S, device=slots.device)[None, :]
        rel = pos - q_start[:, None]
        self.fresh = ((rel >= 0) & (rel < q_len[:, None]))[:, None, :, None]  # [B,1,S,1]
        self.rel = rel.clamp(min=0)
        self.S = S

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, Hk, Q, D = k.shape
        idx = self.rel.clamp(max=Q - 1)[:, None, :, None].expand(B, Hk, self.S, D)
        k_cached = self.store.k[self.slots, layer, :, :self.S]
        v_cached = self.store.v[self.slots, layer, :, :self.S]
        k_all = torch.where(self.fresh, k.gather(2, idx), k_cached.to(k.dtype))
        v_all = torch.where(self.fresh, v.gather(2, idx), v_cached.to(v.dtype))
        return k_all, v_all, self.seqlens
