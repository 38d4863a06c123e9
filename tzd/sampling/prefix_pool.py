"""Prefix reuse across requests for block-causal models: the keys/values of whole prompt blocks.

In a block-causal model a prompt block's keys and values depend only on the tokens before and in it,
so two requests whose prompts start with the same blocks (a system prompt, few-shot examples) need
them computed once. Each full prompt block is keyed by a chain hash of every token up to its end,
held here in least-recently-used order within a byte budget, and given to a new request instead of
being recomputed: exact by construction.

Where a block is whole pages of the paged store (the diffusion block a multiple of the page size), the
pool holds those pages themselves, by reference (vLLM's prefix caching): the request that computed a
block keeps writing its own later positions, the pool takes a reference to the block's pages, and a
request that finds the block points its page table at them (PagedKVStore.share: no copy). A page is
free once neither a request nor the pool holds it; the pool gives up its least recently used blocks
when the store needs pages (reclaim). Otherwise (a block smaller than a page, or not aligned to pages)
the pool keeps copies of the blocks' keys/values and a new request's rows are written from them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from tzd.sampling.kv_pages import PagedKVStore

# a pooled block: its pages of the store (shared), or copies of its keys and values
Entry = list[int] | tuple[torch.Tensor, torch.Tensor]


def block_hashes(prompt: list[int], block: int) -> list[bytes]:
    """One key per full block of `prompt`: a hash of the tokens before and in it (a chain)."""
    out, prev = [], b""
    arr = np.asarray(prompt, dtype=np.int64)
    for end in range(block, len(prompt) + 1, block):
        prev = hashlib.blake2b(prev + arr[end - block:end].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


@dataclass
class PoolStats:
    queries: int = 0  # prompt blocks looked up
    hits: int = 0  # of those, found


class PrefixPool:
    """Prompt blocks by chain hash, LRU within `capacity_bytes`: each block's pages of `kv` (shared) or,
    with no `kv`, copies of its keys/values ([layers, Hk, block, D] each)."""

    def __init__(self, capacity_bytes: int, block: int, kv: PagedKVStore | None = None) -> None:
        self.capacity, self.block, self.kv = capacity_bytes, block, kv
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0
        self.stats = PoolStats()
        self.pending: set[bytes] = set()  # blocks a running request is computing now
        if kv is not None:
            kv.reclaim = self.reclaim

    @property
    def shares_pages(self) -> bool:
        return self.kv is not None

    def _size(self, entry: Entry) -> int:
        if isinstance(entry, list):  # pages of the store
            kv = self.kv
            return len(entry) * kv.page_bytes(kv.layers, kv.kv_heads, kv.head_dim, kv.page_size, kv.k.dtype)
        return 2 * entry[0].numel() * entry[0].element_size()

    def _evict_oldest(self) -> None:
        _, entry = self.entries.popitem(last=False)
        self.bytes -= self._size(entry)
        if isinstance(entry, list):
            self.kv.drop(entry)

    def reclaim(self, pages: int) -> None:
        """The store needs `pages` more free pages: give up blocks, least recently used first, until it has
        them or nothing is left (a block a running request also holds frees its pages only when it ends)."""
        target = self.kv.free_pages + pages
        while self.entries and self.kv.free_pages < target:
            self._evict_oldest()

    def lookup(self, hashes: list[bytes]) -> list[Entry]:
        """The leading run of blocks held here, each marked most recently used (`count` records the query)."""
        found = []
        for h in hashes:
            entry = self.entries.get(h)
            if entry is None:
                break
            self.entries.move_to_end(h)
            found.append(entry)
        return found

    def count(self, queried: int, found: int) -> None:
        self.stats.queries += queried
        self.stats.hits += found

    def put(self, h: bytes, block: Entry) -> None:
        """Keep a block: its pages (a reference: shares_pages) or its keys/values (copies), evicting the least
        recently used to stay within budget."""
        self.pending.discard(h)
        size = self._size(block)
        if h in self.entries or size > self.capacity:
            return
        while self.bytes + size > self.capacity:
            self._evict_oldest()
        if isinstance(block, list):
            self.kv.retain(block)
            self.entries[h] = list(block)
        else:
            self.entries[h] = (block[0].clone(), block[1].clone())
        self.bytes += size
