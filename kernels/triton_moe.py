"""Grouped GEMM for mixture-of-experts rows in Triton: every expert's rows times its own weight, one launch,
no host sync.

The rows come sorted by expert (kernels.moe.sort_by_expert), expert e's rows at [starts[e], ends[e]).
The launch has an upper bound of row tiles, cdiv(rows, BLOCK_M) + experts (each expert wastes at most
one partial tile), so the grid never depends on the counts, which live on the device; each program finds
its expert from the running tile counts (one vector compare over the experts), and programs past the
last tile return at once. An expert no row chose gets no tile. Products accumulate in fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["grouped_mm"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _grouped_mm(x_ptr, w_ptr, out_ptr, starts_ptr, ends_ptr, tile_ends_ptr, E, N, K,
                stride_xm, stride_we, stride_wn, stride_om,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ex = tl.arange(0, BLOCK_E)
    tile_ends = tl.load(tile_ends_ptr + ex, mask=ex < E, other=2147483647)
    e = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)  # the expert whose tiles hold this one
    if e < E:
        first_tile = tl.sum(tl.where(ex == e - 1, tile_ends, 0), axis=0)  # tile_ends[e - 1], 0 for e == 0
        row0 = tl.load(starts_ptr + e) + (pid_m - first_tile) * BLOCK_M
        row_end = tl.load(ends_ptr + e)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=(rows[:, None] < row_end) & (ks[None, :] < K), other=0.0)
            b = tl.load(w_ptr + e * stride_we + cols[None, :] * stride_wn + ks[:, None],
                        mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 is exact for bf16 inputs
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < row_end) & (cols[None, :] < N))


def grouped_mm(rows: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, block_m: int = 32, block_n: int = 64,
               block_k: int = 32) -> torch.Tensor:
    """[M, N]: rows [M, K] sorted by expert (counts [E] rows each) times w [E, N, K] transposed, expert by
    expert (what torch._grouped_mm(rows, w.transpose(1, 2), offs=counts.cumsum(0)) computes)."""
    M, K = rows.shape
    E, N, _ = w.shape
    rows, w = rows.contiguous(), w.contiguous()
    out = rows.new_empty(M, N)
    if M == 0:
        return out
    ends = counts.cumsum(0)
    starts = ends - counts
    tile_ends = ((counts + block_m - 1) // block_m).cumsum(0)
    ends, starts, tile_ends = (t.to(torch.int32).contiguous() for t in (ends, starts, tile_ends))
    grid = (triton.cdiv(M, block_m) + E, triton.cdiv(N, block_n))
    _grouped_mm[grid](rows, w, out, starts, ends, tile_ends, E, N, K, rows.stride(0), w.stride(0), w.stride(1),
                      out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      BLOCK_E=max(triton.next_power_of_2(E), 16), UPCAST=INTERPRETED or rows.dtype == torch.float32)
    return out
