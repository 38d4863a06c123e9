"""The quantized number formats, as plain tensor functions (no modules): quantize a [rows, K] matrix.

int8: symmetric, one scale per row (w ~ q * scale, q in [-127, 127]).
int4: asymmetric, one scale and zero point per group of `group` columns of a row, in the convention of
torch's packed int4 kernels (w ~ (q - 8) * scale + zero, q in [0, 15]).
fp8: e4m3, one scale per row (w ~ q * scale, |q| <= 448).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Rows quantized at a time: the fp32 temporaries of one chunk, not of a whole 126k-row head (2 GiB each at
# LLaDA-8B's widths), are what loading adds to the model. A multiple of 64 (the CPU int4 packer's row block).
ROW_CHUNK = 4096
INT4_MID = 8  # the packed kernels subtract 8 from every nibble before the scale and zero apply
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale fp32 [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 [N, K] in 0..15, scale fp32 [N, K/group], zero fp32 [N, K/group]); K must divide by group."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(N, K), scale, lo + INT4_MID * scale


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The rows int4_groups encodes (q [..., K] int, scale/zero [..., K/group]), in scale's dtype."""
    groups = scale.shape[-1]
    qg = q.reshape(*q.shape[:-1], groups, -1).to(scale.dtype)
    return ((qg - INT4_MID) * scale[..., None] + zero[..., None]).reshape(q.shape)


def nibbles_pack(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] in 0..15 (K even) as uint8 [..., K/2]: column 2j in the high nibble, 2j+1 in the low one."""
    q = q.to(torch.uint8)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def int4_nibble_rows(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4_groups with q packed two to a byte (nibbles_pack)."""
    q, scale, zero = int4_groups(w, group)
    return nibbles_pack(q), scale, zero


def nibbles_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of nibbles_pack: uint8 [..., K/2] -> uint8 [..., K]."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten(-2)


def fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [N, K], scale fp32 [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def in_row_chunks(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], w: torch.Tensor,
                  rows: int = ROW_CHUNK) -> tuple[torch.Tensor, ...]:
    """fn applied to `rows` rows of w at a time, each output written into its place in one preallocated
    tensor (no list of parts beside the whole). Every format here treats rows independently, and so do the
    int4 packers in blocks of 64 rows; an output's first dim is proportional to the rows (CUDA's packed
    int4 holds 8 rows per entry)."""
    N = w.shape[0]
    if N <= rows:
        return fn(w)
    outs: tuple[torch.Tensor, ...] = ()
    for i in range(0, N, rows):
        parts = fn(w[i:i + rows])
        if not outs:  # the first chunk has exactly `rows` rows: it gives each output's rows per input row
            outs = tuple(torch.empty((p.shape[0] * N // rows, *p.shape[1:]), dtype=p.dtype, device=p.device)
                         for p in parts)
        for out, part in zip(outs, parts, strict=True):
            start = i * out.shape[0] // N
            out[start:start + part.shape[0]].copy_(part)
    return outs


def pad_to(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """w [N, K] with zero rows and columns appended up to multiples of `rows` and `cols`."""
    pad_n, pad_k = -w.shape[0] % rows, -w.shape[1] % cols
    return torch.nn.functional.pad(w, (0, pad_k, 0, pad_n)) if pad_n or pad_k else w
