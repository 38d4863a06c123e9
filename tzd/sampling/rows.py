"""The per-row values of one step, built on the host and sent to the device in one copy.

A step needs a dozen small per-row vectors (slot, block start, seed, temperature, ...). Sent one by
one, each would be a host-to-device copy, and on CUDA a blocking copy waits for the stream: the host
could not queue the next kernels while the GPU works. Packed into one int64 table (floats as their
float64 bits) they are a single non-blocking copy from pinned memory, split on the device into views
by a handful of ops (not one per field).
"""

from __future__ import annotations

import numpy as np
import torch

# Field order is the table's column order: the step's own values first, then the request's fixed ones
# (slot.Slot.row), the integers before the flag before the floats so that each kind converts in one op.
INT_FIELDS = ("slot", "start", "window_start", "key_len", "query_len", "steps_done", "steps_left", "commits",
              "total_len", "prompt_len", "seed", "top_k")
BOOL_FIELDS = ("random_remask",)
FLOAT_FIELDS = ("temperature", "top_p", "threshold", "cfg_scale", "entropy_bound")
FIELDS = (*INT_FIELDS, *BOOL_FIELDS, *FLOAT_FIELDS)
COLUMN = {name: i for i, name in enumerate(FIELDS)}  # a field's column in the host table


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`, without a stream sync on CUDA (pinned, non-blocking)."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def download(*tensors: torch.Tensor | None) -> list[np.ndarray | None]:
    """Device tensors on the host in one copy (one sync): flattened into one int64 vector (float32 as its
    bits), split and reshaped back on the host. None stays None."""
    given = [t for t in tensors if t is not None]
    if all(t.device.type == "cpu" for t in given):  # already on the host: numpy views, no copy
        return [t.numpy() if t is not None else None for t in tensors]
    flat = torch.cat([(t.view(torch.int32) if t.dtype == torch.float32 else t).reshape(-1).long() for t in given])
    host = flat.cpu().numpy()
    out: list[np.ndarray | None] = []
    at = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        part = host[at:at + t.numel()].reshape(t.shape)
        at += t.numel()
        out.append(part.astype(np.int32).view(np.float32) if t.dtype == torch.float32 else part)
    return out


def float_bits(value: float) -> int:
    """A float as the int64 of its float64 bits (how the table carries floats)."""
    return int(np.float64(value).view(np.int64))


class RowValues:
    """One device tensor [rows] per field of FIELDS, in the batch's row order for this step."""

    slot: torch.Tensor
    start: torch.Tensor  # the current block's first canvas position
    window_start: torch.Tensor  # first column a cached forward runs
    key_len: torch.Tensor  # keys a cached forward attends to (the canvas; up to the block's end when exact)
    query_len: torch.Tensor  # columns a cached forward runs (prefix: block to end; dual: the block)
    steps_done: torch.Tensor
    steps_left: torch.Tensor  # steps left in the current block's budget (>= 1)
    commits: torch.Tensor  # positions the schedule commits this step (a threshold may commit more)
    total_len: torch.Tensor  # prompt + max_tokens: the row's canvas (and key) length
    prompt_len: torch.Tensor
    seed: torch.Tensor
    top_k: torch.Tensor
    random_remask: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    threshold: torch.Tensor  # 0 = none
    cfg_scale: torch.Tensor
    entropy_bound: torch.Tensor  # 0 = none
    offsets: torch.Tensor  # [rows, P]: block offsets still masked, ascending; -1 pads a row's tail
    positions: torch.Tensor  # [rows, P]: their canvas positions; the scratch column for the padding
    table: np.ndarray  # the host table it was built from (the step's bookkeeping reads it)
    host_offsets: np.ndarray  # `offsets` on the host

    @classmethod
    def build(cls, table: np.ndarray, offsets: np.ndarray, positions: np.ndarray,
              device: torch.device) -> RowValues:
        """`table` [rows, >= len(FIELDS)] int64 in FIELDS order (floats as float64 bits; columns past
        FIELDS are the host's own); `offsets` and `positions` the [rows, P] int64 matrices."""
        if device.type == "cpu":  # the host arrays are the values: each field's tensor is made where read
            self = cls()
            self.table, self.host_offsets = table, offsets
            self.offsets, self.positions = torch.from_numpy(offsets), torch.from_numpy(positions)
            return self
        n, F, P = table.shape[0], len(FIELDS), offsets.shape[1]
        host = np.empty((F + 2 * P, n), dtype=np.int64)  # a field per row: contiguous slices
        host[:F] = table[:, :F].T
        host[F:F + P] = offsets.T
        host[F + P:] = positions.T
        t = upload(host, device)
        self = cls()
        i, b = len(INT_FIELDS), len(INT_FIELDS) + len(BOOL_FIELDS)
        for name, col in zip(INT_FIELDS, t[:i].unbind(0), strict=True):
            setattr(self, name, col)
        for name, col in zip(BOOL_FIELDS, t[i:b].bool().unbind(0), strict=True):
            setattr(self, name, col)
        for name, col in zip(FLOAT_FIELDS, t[b:F].view(torch.float64).float().unbind(0), strict=True):
            setattr(self, name, col)
        self.offsets, self.positions = t[F:F + P].T, t[F + P:].T
        self.table, self.host_offsets = table, offsets
        return self

    def __getattr__(self, name: str) -> torch.Tensor:
        """A field not made yet (CPU: build leaves them to the first read, most steps read a few)."""
        col = COLUMN.get(name)
        if col is None or "table" not in self.__dict__:
            raise AttributeError(name)
        t = torch.from_numpy(np.ascontiguousarray(self.table[:, col]))
        if name in BOOL_FIELDS:
            t = t.bool()
        elif name in FLOAT_FIELDS:
            t = t.view(torch.float64).float()
        setattr(self, name, t)
        return t

    def rows(self, start: int, stop: int) -> RowValues:
        """The values of rows [start, stop) (this object itself when that is all of them)."""
        if start == 0 and stop == len(self.table):
            return self
        part = RowValues()
        made = [n for n in FIELDS if n in self.__dict__]  # on CPU the others stay to be made from the table
        for name in (*made, "offsets", "positions", "table", "host_offsets"):
            setattr(part, name, getattr(self, name)[start:stop])
        return part
