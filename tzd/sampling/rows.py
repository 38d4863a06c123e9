"""The per-row values of one step, built on the host and sent to the device in one copy.

A step needs a dozen small per-row vectors (slot, block start, seed, temperature, ...). Sent one by
one, each would be a host-to-device copy, and on CUDA a blocking copy waits for the stream: the host
could not queue the next kernels while the GPU works. Packed into one int64 table (floats as their
float64 bits) they are a single non-blocking copy from pinned memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

FIELDS: dict[str, torch.dtype] = {
    "slot": torch.long, "start": torch.long, "window_start": torch.long, "key_len": torch.long,
    "total_len": torch.long,
    "prompt_len": torch.long, "query_len": torch.long, "seed": torch.long, "steps_done": torch.long,
    "steps_left": torch.long, "top_k": torch.long, "random_remask": torch.bool,
    "temperature": torch.float32, "top_p": torch.float32, "threshold": torch.float32, "cfg_scale": torch.float32,
}


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`, without a stream sync on CUDA (pinned, non-blocking)."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class RowValues:
    """One device tensor [rows] per field of FIELDS, in the batch's row order for this step."""

    slot: torch.Tensor
    start: torch.Tensor  # the current block's first canvas position
    window_start: torch.Tensor  # first column a cached forward runs
    key_len: torch.Tensor  # keys a cached forward attends to (the canvas; up to the block's end when exact)
    total_len: torch.Tensor  # prompt + max_tokens: the row's canvas (and key) length
    prompt_len: torch.Tensor
    query_len: torch.Tensor  # columns a cached forward runs (prefix: block to end; dual: the block)
    seed: torch.Tensor
    steps_done: torch.Tensor
    steps_left: torch.Tensor  # steps left in the current block's budget
    top_k: torch.Tensor
    random_remask: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    threshold: torch.Tensor  # 0 = none
    cfg_scale: torch.Tensor
    offsets: torch.Tensor  # [rows, P]: block offsets still masked, ascending; -1 pads a row's tail

    @classmethod
    def build(cls, columns: dict[str, Sequence[int | float | bool]], offsets: np.ndarray,
              device: torch.device) -> RowValues:
        """`columns` maps every field to its per-row values; `offsets` is the [rows, P] int64 matrix."""
        n, F = len(columns["slot"]), len(FIELDS)
        host = np.empty((F + offsets.shape[1], n), dtype=np.int64)  # a field per row: contiguous slices
        for i, (name, dtype) in enumerate(FIELDS.items()):
            values = columns[name]
            host[i] = np.asarray(values, dtype=np.float64).view(np.int64) if dtype.is_floating_point else values
        host[F:] = offsets.T
        table = upload(host, device)
        self = cls()
        for i, (name, dtype) in enumerate(FIELDS.items()):
            col = table[i]
            if dtype.is_floating_point:
                col = col.view(torch.float64).to(dtype)
            elif dtype == torch.bool:
                col = col.bool()
            setattr(self, name, col)
        self.offsets = table[F:].T
        return self

    def rows(self, start: int, stop: int) -> RowValues:
        """The values of rows [start, stop)."""
        part = RowValues()
        for name in (*FIELDS, "offsets"):
            setattr(part, name, getattr(self, name)[start:stop])
        return part
