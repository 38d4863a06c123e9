"""CUDA graphs of the cached forward: the step of a request inside a block, replayed instead of launched.

On a GPU a small model's step is host-bound: each of its few hundred kernels costs more to launch than
to run. Inside a block the cached forward has fixed shapes (the query window, the keys), so it is
captured once per shape bucket, (rows, window columns, keys), and replayed: one launch for the whole
forward. Rows are padded up to the next bucket of `BATCH_BUCKETS` and keys up to a multiple of
`KEY_BUCKET` (padding rows write the store's scratch page and read it with one valid key; padding keys
are masked by each row's key length), so the tokens are the eager forward's. The graph computes the
logits of every window column; the block's open ones are gathered after the replay (their count falls
step by step, a shape a graph cannot follow).

Everything a captured forward reads lives in static buffers filled before each replay; the paged store
is read and written through flat indices in them. Graphs are captured lazily, on the first step of
each shape (after one eager warm-up run there, which also autotunes Triton), at most `MAX_GRAPHS`; a
shape beyond them, a batch beyond the largest bucket or a failed capture runs eagerly. With
`capture=False` the same padded static path runs eagerly: on CPU that is how the bucketing is tested.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from tzd.models import ForwardContext
from tzd.sampling.cache import ReadView
from tzd.sampling.kv_pages import PagedKVStore

log = logging.getLogger("tzd.sampling")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
KEY_BUCKET = 64
MAX_GRAPHS = 64


@dataclass
class _Bucket:
    ids: torch.Tensor  # [R, Q]
    positions: torch.Tensor  # [R, Q]
    write_index: torch.Tensor  # [R, Q] flat store indices
    read_index: torch.Tensor  # [R, S]
    seqlens: torch.Tensor  # [R]
    blocks: torch.Tensor | None  # [R, context] block ids (block-causal models)
    logits: torch.Tensor | None = None  # [R, Q, V]: the captured forward's output
    graph: torch.cuda.CUDAGraph | None = None
    runs: int = 0


class WindowGraphs:
    """Captured cached forwards of `model` over the paged `store`, by (rows, window, keys) bucket."""

    def __init__(self, model: nn.Module, store: PagedKVStore, mask_id: int, context: int, block_causal: bool,
                 capture: bool = True) -> None:
        if capture and store.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {store.device}")
        self.model, self.store, self.mask_id, self.context = model, store, mask_id, context
        self.block_causal, self.capture = block_causal, capture
        self.buckets: dict[tuple[int, int, int], _Bucket | None] = {}  # None: this shape runs eagerly
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._store_ptr: int | None = None

    @staticmethod
    def bucket_rows(n: int) -> int | None:
        return next((b for b in BATCH_BUCKETS if b >= n), None)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, write_index: torch.Tensor, read_index: torch.Tensor,
            seqlens: torch.Tensor, blocks: torch.Tensor | None, opened: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, P, V] at `opened` [B, P] window columns, through a bucket's graph; None where this
        shape runs eagerly (the caller's own forward)."""
        B, Q = ids.shape
        S = read_index.shape[1]
        R = self.bucket_rows(B)
        if R is None:
            return None
        key = (R, Q, min(-(-S // KEY_BUCKET) * KEY_BUCKET, self.context))
        if self.store.k is not None and self._store_ptr not in (None, self.store.k.data_ptr()):
            self.buckets.clear()  # the store was reallocated (another dtype): the graphs read the old one
        if key not in self.buckets:
            if len(self.buckets) >= MAX_GRAPHS:
                return None
            self.buckets[key] = self._new_bucket(*key, ids.device)
        b = self.buckets[key]
        if b is None:
            return None
        self._fill(b, ids, positions, write_index, read_index, seqlens, blocks)
        if b.graph is not None:
            b.graph.replay()
        elif self.capture and b.runs >= 1:  # warmed up (eagerly, below): capture now, then replay
            if not self._capture(key, b):
                return None
            b.graph.replay()
        else:
            b.logits = self._forward(b)
        b.runs += 1
        out = b.logits[:B]
        return out.gather(1, opened[..., None].expand(-1, -1, out.shape[-1]))

    def _new_bucket(self, R: int, Q: int, S: int, device: torch.device) -> _Bucket:
        long = dict(dtype=torch.long, device=device)
        return _Bucket(torch.full((R, Q), self.mask_id, **long), torch.zeros((R, Q), **long),
                       torch.zeros((R, Q), **long), torch.zeros((R, S), **long), torch.ones(R, **long),
                       torch.zeros((R, self.context), **long) if self.block_causal else None)

    def _fill(self, b: _Bucket, ids: torch.Tensor, positions: torch.Tensor, write_index: torch.Tensor,
              read_index: torch.Tensor, seqlens: torch.Tensor, blocks: torch.Tensor | None) -> None:
        """Copy this step's inputs into the bucket's buffers; padding rows and keys address scratch."""
        B, S = ids.shape[0], read_index.shape[1]
        scratch = self.store.num_pages * self.store.page_size  # the scratch page's first position
        b.ids[B:] = self.mask_id
        b.ids[:B] = ids
        b.positions[B:] = 0
        b.positions[:B] = positions
        b.write_index.fill_(scratch)
        b.write_index[:B] = write_index
        b.read_index.fill_(scratch)
        b.read_index[:B, :S] = read_index
        b.seqlens.fill_(1)
        b.seqlens[:B] = seqlens
        if b.blocks is not None:
            b.blocks[B:] = 0
            b.blocks[:B] = blocks

    def _forward(self, b: _Bucket) -> torch.Tensor:
        view = ReadView(self.store, b.write_index, b.seqlens, b.read_index)  # always a gather: static indices
        return self.model(b.ids, ForwardContext(positions=b.positions, seqlens=b.seqlens, cache=view,
                                                block_ids=b.blocks))

    def _capture(self, key: tuple[int, int, int], b: _Bucket) -> bool:
        """Capture the bucket's forward (its buffers already hold this step's inputs, so the capture's
        writes to the store are this step's own). False, and this shape runs eagerly from now on, if the
        forward cannot be captured."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                b.logits = self._forward(b)
        except Exception as e:  # noqa: BLE001 - a forward that cannot be captured still runs eagerly
            log.warning("CUDA graph capture of the cached step %s failed (%s: %s); it runs eagerly",
                        key, type(e).__name__, e)
            self.buckets[key] = None
            return False
        b.graph = graph
        self._store_ptr = self.store.k.data_ptr()
        return True
