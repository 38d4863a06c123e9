"""The KV cache's views of one forward: what each attention layer writes to and reads from the paged store.

Approximate cache (Fast-dLLM prefix and dual, bidirectional models): at a block's first step a full
forward records every layer's keys/values for the whole canvas (RecordView, PackedRecordView); inside
the block, a cached forward runs only the query window (prefix: the block and everything after it; dual:
the block alone), writes the window's fresh keys/values over the recorded ones and attends to the whole
recorded canvas (ReadView). Exact cache (block-causal models): the window starts at the first position
whose keys are not final yet and attends to the keys up to its block's end. Keys keep their absolute
canvas positions; the store (kv_pages.py) maps them to pages. Every view computes its flat indices once
per forward: the layers only index with them.
"""

from __future__ import annotations

import numpy as np
import torch

from tzd.sampling.kv_pages import PagedKVStore


class RecordView:
    """A padded full forward of T columns that also records the keys/values of `slots` (rows of the
    batch, in order; rows past them are unconditional CFG copies, not cached)."""

    def __init__(self, store: PagedKVStore, slots: torch.Tensor, seqlens: torch.Tensor | None, columns: int) -> None:
        self.store, self.seqlens = store, seqlens
        self.index = store.flat(slots, torch.arange(columns, device=slots.device).expand(len(slots), -1))

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.store.ensure(k.dtype)
        n = self.index.shape[0]
        self.store.write(layer, self.index, k[:n], v[:n])
        return k, v, self.seqlens


class PackedRecordView:
    """RecordView for packed rows (one row of N tokens): token i's keys/values go to (slots[i], positions[i]).
    Tokens past len(slots) are unconditional (CFG) copies: not cached."""

    def __init__(self, store: PagedKVStore, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self.store = store
        self.index = store.flat(slots, positions)  # [n]

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.store.ensure(k.dtype)
        n = len(self.index)  # [1,Hk,N,D] -> [Hk,n,D]
        self.store.write(layer, self.index, k[0, :, :n], v[0, :, :n])
        return k, v, None


class ReadView:
    """A cached forward of a query window: row b's fresh keys/values belong at `positions[b]` (absolute
    canvas positions; the store's scratch position for padding columns). Each layer writes them into the
    store, then attends to the stored canvas [0, keys) (`seqlens` masks a row's keys past its own length).
    Writing in place is safe: a request's window is the same at every step of a block, and the next block
    starts by recording (approximate) or by writing the keys that became final (exact)."""

    def __init__(self, store: PagedKVStore, write_index: torch.Tensor, seqlens: torch.Tensor | None,
                 read_index: torch.Tensor | None = None, strided: tuple[int, int] | None = None,
                 keys: int | None = None) -> None:
        """`write_index` [B, Q]: the window's flat store indices; the keys are read at `read_index` [B, S],
        or as a strided view (PagedKVStore.strided_rows) of `keys` keys."""
        self.store, self.seqlens, self.write_index = store, seqlens, write_index
        self.read_index, self.strided = read_index, strided
        self.keys = keys if keys is not None else read_index.shape[1]

    @classmethod
    def of_rows(cls, store: PagedKVStore, slots: torch.Tensor, write_index: torch.Tensor, keys: int,
                seqlens: torch.Tensor | None, host_slots: np.ndarray) -> ReadView:
        """The view for rows `slots` (`host_slots` on the host) reading keys [0, keys): a strided view
        where their pages are consecutive, else a gather."""
        strided = store.strided_rows(host_slots, keys)
        if strided is not None:
            return cls(store, write_index, seqlens, strided=strided, keys=keys)
        return cls(store, write_index, seqlens, store.flat(slots, torch.arange(keys, device=slots.device)
                                                           .expand(len(slots), -1)))

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.store.ensure(k.dtype)  # the exact cache's first forward is a window (the prompt and block 0)
        self.store.write(layer, self.write_index, k, v)
        if self.strided is not None:
            k_all, v_all = self.store.read_strided(layer, len(self.write_index), *self.strided, self.keys)
        else:
            k_all, v_all = self.store.read(layer, self.read_index)
        return k_all.to(k.dtype), v_all.to(v.dtype), self.seqlens
