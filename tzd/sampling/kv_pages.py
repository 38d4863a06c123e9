"""Paged keys/values: one pool of fixed-size pages shared by every request, and a page table per slot.

A dense store reserves slots x full context (an LLaDA-8B-shaped model at 16 slots x 4096 tokens: 34 GB)
whatever the requests hold. Here the memory is a pool of pages of `page_size` positions for every layer,
sized by a byte budget; a request that uses the cache takes the pages its canvas needs (prompt +
max_tokens, known when it starts: a diffusion canvas never grows) and gives them back when it leaves,
so KV memory follows the tokens in flight and admission can wait for free pages (the scheduler counts
them with `pages_for`).

Storage is [layers, Hk, (pages + 1) * page_size, D] for keys and for values (head-major: a single row's
window and keys are then views, no copies), and a forward addresses positions through flat token
indices: slot b's position p lives at table[b, p // page_size] * page_size + p % page_size. The
indices are computed once per forward (not per layer) on the device from the device copy of the page
table, which changes only when a request joins. Page `pages` is scratch: unallocated table entries
point at it, so the padding columns of a batched forward (written, never read unmasked) can never
touch another request's pages.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tzd.sampling.rows import upload


class PagedKVStore:
    """`num_pages` pages of `page_size` positions for `capacity` slots of up to `context` positions."""

    def __init__(self, capacity: int, layers: int, kv_heads: int, head_dim: int, context: int, page_size: int,
                 num_pages: int, device: torch.device) -> None:
        if page_size < 1 or num_pages < 0:
            raise ValueError(f"page_size {page_size} and num_pages {num_pages}: need page_size >= 1, pages >= 0")
        self.page_size, self.num_pages, self.device = page_size, num_pages, device
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        # one table column more than a context needs: its entry is always the scratch page, and `scratch`
        # (a position in it) is where padding columns write
        self.columns = math.ceil(context / page_size) + 1
        self.scratch = (self.columns - 1) * page_size
        self.host_table = np.full((capacity, self.columns), num_pages, dtype=np.int64)
        self.table = torch.from_numpy(self.host_table.copy()).to(device)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives the lowest first
        self._held: list[list[int]] = [[] for _ in range(capacity)]
        # holders of each page: the slots whose table points at it and the prefix pool (shared prompt
        # blocks); a page is free again when the last of them lets go
        self.refs = np.zeros(num_pages, dtype=np.int64)
        self.reclaim = None  # callable(pages): frees pages held only by the prefix pool (when it shares)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @staticmethod
    def page_bytes(layers: int, kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page: keys and values of `page_size` positions in every layer."""
        return 2 * layers * page_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def dense_bytes(cls, capacity: int, layers: int, kv_heads: int, head_dim: int, context: int, page_size: int,
                    dtype: torch.dtype) -> int:
        """Bytes of pages for every slot to hold a whole context: what a dense store would reserve."""
        return capacity * math.ceil(context / page_size) * cls.page_bytes(layers, kv_heads, head_dim, page_size,
                                                                          dtype)

    @classmethod
    def sized(cls, capacity: int, layers: int, kv_heads: int, head_dim: int, context: int, page_size: int,
              budget_bytes: int | None, dtype: torch.dtype, device: torch.device) -> PagedKVStore:
        """As many pages as `budget_bytes` holds in `dtype` (None: dense_bytes, so that pages never limit
        admission)."""
        if budget_bytes is None:
            budget_bytes = cls.dense_bytes(capacity, layers, kv_heads, head_dim, context, page_size, dtype)
        pages = int(budget_bytes // cls.page_bytes(layers, kv_heads, head_dim, page_size, dtype))
        return cls(capacity, layers, kv_heads, head_dim, context, page_size, pages, device)

    def capacity_bytes(self, dtype: torch.dtype) -> int:
        """Bytes the pool takes once allocated in `dtype` (the scratch page included)."""
        return (self.num_pages + 1) * self.page_bytes(self.layers, self.kv_heads, self.head_dim, self.page_size, dtype)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pages held by requests (0 for a pool of no pages)."""
        return 1.0 - len(self._free) / self.num_pages if self.num_pages else 0.0

    def ensure(self, dtype: torch.dtype) -> None:
        """Allocate the pool on first use, in the dtype the model's keys come in."""
        if self.k is None or self.k.dtype != dtype:
            shape = (self.layers, self.kv_heads, (self.num_pages + 1) * self.page_size, self.head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    # ---- allocation (host; the device table is updated once per join) ---------------------------

    def allocate(self, slot: int, tokens: int) -> None:
        """Give `slot` the pages for positions [0, tokens); raises MemoryError when too few are free."""
        need = self.pages_for(tokens)
        if need > len(self._free) and self.reclaim is not None:
            self.reclaim(need - len(self._free))
        if need > len(self._free):
            raise MemoryError(f"{tokens} tokens need {need} KV pages; {len(self._free)} of {self.num_pages} "
                              "are free")
        self.release(slot)
        pages = [self._free.pop() for _ in range(need)]
        self.refs[pages] = 1
        self._held[slot] = pages
        self._set_row(slot, pages)

    def release(self, slot: int) -> None:
        """`slot` lets go of its pages (each is free once nothing else holds it); its table row points at
        scratch again, so that a later request in this slot that holds no pages (no cache) cannot write
        into them."""
        if self._held[slot]:
            self.drop(self._held[slot])
            self._held[slot] = []
            self._set_row(slot, [])

    def retain(self, pages: list[int]) -> None:
        """One more holder (the prefix pool) of `pages`."""
        self.refs[pages] += 1

    def drop(self, pages: list[int]) -> None:
        """One holder fewer of each of `pages`; those nothing holds any more are free."""
        self.refs[pages] -= 1
        self._free.extend(p for p in reversed(pages) if self.refs[p] == 0)

    def held(self, slot: int, first: int, count: int) -> list[int]:
        """Pages [first, first + count) of `slot`'s table."""
        return self._held[slot][first:first + count]

    def share(self, slot: int, first: int, pages: list[int]) -> None:
        """Point `slot`'s table entries from `first` on at `pages` (held elsewhere too: the pool's prompt
        blocks), letting go of the pages it held there: a prefix is attached without a copy."""
        held = self._held[slot]
        old = held[first:first + len(pages)]
        held[first:first + len(pages)] = pages
        self.retain(pages)
        self.drop(old)
        self._set_row(slot, held)

    def _set_row(self, slot: int, pages: list[int]) -> None:
        self.host_table[slot] = self.num_pages
        self.host_table[slot, :len(pages)] = pages
        self.table[slot] = upload(self.host_table[slot].copy(), self.device)  # non-blocking on CUDA

    # ---- addressing (device) --------------------------------------------------------------------

    def flat(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat token indices of `positions` ([B, T], or [N] with `slots` [N]) in the rows of `slots` [B]."""
        rows = self.table[slots]  # [B, columns] (or [N, columns])
        if positions.dim() == 1:
            page = rows.gather(1, (positions // self.page_size)[:, None])[:, 0]
        else:
            page = rows.gather(1, positions // self.page_size)
        return page * self.page_size + positions % self.page_size

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [B, Hk, T, D] (or [Hk, N, D] with `index` [N]) at flat `index` [B, T]."""
        flat = index.reshape(-1)
        if k.dim() == 4:  # [Hk, B*T, D]: a view when B == 1
            k, v = (t.transpose(0, 1).reshape(self.kv_heads, -1, self.head_dim) for t in (k, v))
        self.k[layer].index_copy_(1, flat, k.to(self.k.dtype))
        self.v[layer].index_copy_(1, flat, v.to(self.v.dtype))

    def read(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, Hk, S, D] at flat `index` [B, S] (a gather: pages need not be contiguous)."""
        B, S = index.shape
        flat = index.reshape(-1)
        k = self.k[layer].index_select(1, flat).view(self.kv_heads, B, S, self.head_dim)
        v = self.v[layer].index_select(1, flat).view(self.kv_heads, B, S, self.head_dim)
        return k.transpose(0, 1), v.transpose(0, 1)

    def strided_rows(self, slots: np.ndarray, keys: int) -> tuple[int, int] | None:
        """(flat start of the first row, flat distance between rows) when the positions [0, keys) of the
        rows of `slots` (host ids) lie in consecutive pages at one distance from each other (a lone
        row in consecutive pages, or equal requests that joined an unfragmented pool together): the
        step then reads them as a strided view instead of a gather. None otherwise."""
        n = self.pages_for(keys)
        first = self.host_table[slots, :n]
        if (first[:, :1] >= self.num_pages).any() or (n > 1 and (np.diff(first, axis=1) != 1).any()):
            return None
        starts = first[:, 0] * self.page_size
        step = int(starts[1] - starts[0]) if len(starts) > 1 else 0
        if step < 0 or (len(starts) > 2 and (np.diff(starts) != step).any()):
            return None
        return int(starts[0]), step

    def read_strided(self, layer: int, rows: int, start: int, step: int, keys: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [rows, Hk, keys, D] as views of the store (see strided_rows)."""
        def view(t: torch.Tensor) -> torch.Tensor:
            hk_stride, tok_stride = t.stride(0), t.stride(1)
            return t.as_strided((rows, self.kv_heads, keys, self.head_dim),
                                (step * tok_stride, hk_stride, tok_stride, 1),
                                t.storage_offset() + start * tok_stride)
        return view(self.k[layer]), view(self.v[layer])

    # ---- whole-slot access (prefix pool, tests) --------------------------------------------------

    def gather(self, slot: int, positions: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's k, v [layers, Hk, T, D] of `slot` at `positions` (copies)."""
        idx = self._slot_index(slot, positions.start or 0, positions.stop)
        return self.k[:, :, idx], self.v[:, :, idx]

    def scatter(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store every layer's k, v [layers, Hk, T, D] at positions [start, start + T) of `slot`."""
        idx = self._slot_index(slot, start, start + k.shape[2])
        self.k[:, :, idx] = k.to(self.k.dtype)
        self.v[:, :, idx] = v.to(self.v.dtype)

    def _slot_index(self, slot: int, start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop, device=self.device)
        return self.flat(torch.full_like(pos, slot), pos)
