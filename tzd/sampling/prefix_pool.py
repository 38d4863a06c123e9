"""Prefix reuse across requests for block-causal models: the keys/values of whole prompt blocks.

In a block-causal model a prompt block's keys and values depend only on the tokens before and in it,
so two requests whose prompts start with the same blocks (a system prompt, few-shot examples) need
them computed once. Each full prompt block is keyed by a chain hash of every token up to its end,
held here (on the model's device) in least-recently-used order within a byte budget, and copied into
a new request's rows of the KV store instead of being recomputed: exact by construction.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


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
    """Prompt blocks' keys/values ([layers, Hk, block, D] each) by chain hash, LRU within `capacity_bytes`."""

    def __init__(self, capacity_bytes: int, block: int) -> None:
        self.capacity, self.block = capacity_bytes, block
        self.entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.stats = PoolStats()
        self.pending: set[bytes] = set()  # blocks a running request is computing now

    def lookup(self, hashes: list[bytes]) -> list[tuple[torch.Tensor, torch.Tensor]]:
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

    def put(self, h: bytes, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a block's keys/values (copies), evicting the least recently used to stay within budget."""
        self.pending.discard(h)
        size = 2 * k.numel() * k.element_size()
        if h in self.entries or size > self.capacity:
            return
        while self.bytes + size > self.capacity:
            _, (ok, _) = self.entries.popitem(last=False)
            self.bytes -= 2 * ok.numel() * ok.element_size()
        self.entries[h] = (k.clone(), v.clone())
        self.bytes += size
