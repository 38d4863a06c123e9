"""Block KV cache (Fast-dLLM prefix and dual cache, approximate).

At a block's first step a full forward records every layer's keys/values for the whole canvas.
Inside the block, a cached forward runs only the query window (prefix: the block and everything
after it; dual: the block alone), writes the window's fresh keys/values over the recorded ones and
attends to the whole recorded canvas. Keys keep their absolute layout, so the key length
of a row is simply its canvas length.
"""

from __future__ import annotations

import torch


class KVStore:
    """Keys/values per slot: [slots, layers, Hk, context + 1, D] each, allocated on first use.

    Position `context` is scratch: the padding columns of a query window write there, never read."""

    def __init__(self, slots: int, layers: int, kv_heads: int, context: int, head_dim: int,
                 device: torch.device) -> None:
        self.scratch = context
        self.shape = (slots, layers, kv_heads, context + 1, head_dim)
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


class PackedRecordView:
    """RecordView for packed rows (one row of N tokens): token i's keys/values go to (slots[i], positions[i]).
    Tokens past len(slots) are unconditional (CFG) copies: not cached."""

    def __init__(self, store: KVStore, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self.store, self.slots, self.positions = store, slots, positions

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.store.ensure(k.dtype)
        n = len(self.slots)  # [1,Hk,N,D] -> [n,Hk,D]: the layout the (slots, layer, :, positions) index takes
        self.store.k[self.slots, layer, :, self.positions] = k[0, :, :n].transpose(0, 1)
        self.store.v[self.slots, layer, :, self.positions] = v[0, :, :n].transpose(0, 1)
        return k, v, None


class ReadView:
    """A cached forward of a query window: row b's fresh keys/values belong at `positions[b]`
    (absolute canvas positions; the scratch position for padding columns). Each layer writes them
    into the store, then attends to the stored canvas [0, S). Writing in place is safe: a request's
    window is the same at every step of a block, and the next block starts with a full forward
    that records everything again."""

    def __init__(self, store: KVStore, slots: torch.Tensor, positions: torch.Tensor, keys: int,
                 seqlens: torch.Tensor | None, slot_range: tuple[int, int] | None = None,
                 window_start: int | None = None) -> None:
        self.store, self.positions, self.S, self.seqlens = store, positions, keys, seqlens
        self.rows = slots[:, None].expand_as(positions)
        # consecutive slots are read as a view (no copy); others by advanced indexing
        self.read_index = slice(*slot_range) if slot_range is not None else slots
        # consecutive slots whose windows all start at `window_start`, without padding columns, are
        # written by slicing too (a plain copy instead of an index_put)
        self.write_window = None
        if slot_range is not None and window_start is not None:
            self.write_window = (slice(*slot_range), slice(window_start, window_start + positions.shape[1]))

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.store.ensure(k.dtype)  # the exact cache's first forward is a window (the prompt and block 0)
        store_k, store_v = self.store.k, self.store.v
        if self.write_window is not None:
            rows, cols = self.write_window
            store_k[rows, layer, :, cols] = k
            store_v[rows, layer, :, cols] = v
        else:  # [B,Hk,Q,D] -> [B,Q,Hk,D]: the layout the (rows, layer, :, positions) index produces
            store_k[self.rows, layer, :, self.positions] = k.transpose(1, 2).to(store_k.dtype)
            store_v[self.rows, layer, :, self.positions] = v.transpose(1, 2).to(store_v.dtype)
        k_all = store_k[self.read_index, layer, :, :self.S]
        v_all = store_v[self.read_index, layer, :, :self.S]
        return k_all.to(k.dtype), v_all.to(v.dtype), self.seqlens
