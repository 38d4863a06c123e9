"""Mixture-of-experts feed-forward compute: the routed tokens grouped by expert, one GEMM per expert.

A token routed to k experts becomes k rows. The rows are sorted by expert id (stable, so a row's
place follows its token's), every expert multiplies its own contiguous slice, and the rows go back
to their tokens, weighted and summed in fp32. No loop runs over tokens; the loop (where one runs)
is over experts, and an expert no token chose costs nothing.

Three paths give the same rows:
- torch._grouped_mm (torch >= 2.8: one call for all experts, on CPU and on CUDA in bf16 on sm90+ with
  aligned widths) when no gradient is needed;
- on CUDA otherwise, the Triton grouped GEMM (kernels/triton_moe.py: one launch per matrix, no host sync)
  when no gradient is needed;
- a loop over the experts that received rows, one matmul each (training, CPU dtypes _grouped_mm lacks,
  and the batch-invariant mode, where each expert's rows go through fixed-size padded tiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): rows idx.flatten()[order] are grouped by expert id; counts [E] rows per expert."""
    flat = idx.flatten()
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=n_experts)


def _grouped_mm_usable(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ws)):  # its CPU backward fails
        return False
    if x.is_cuda:  # the CUDA kernel takes bf16 on sm90+ with 16-byte aligned rows (widths multiple of 8)
        aligned = all(w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in ws)
        return x.dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


def _swiglu_grouped_mm(rows: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                       w2: torch.Tensor) -> torch.Tensor:
    offs = counts.cumsum(0).to(torch.int32)
    gate = torch._grouped_mm(rows, w1.transpose(1, 2), offs=offs)
    up = torch._grouped_mm(rows, w3.transpose(1, 2), offs=offs)
    return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)


def _triton_grouped(x: torch.Tensor, *ws: torch.Tensor):  # noqa: ANN202 - the kernel module's grouped_mm or None
    """kernels.triton_moe.grouped_mm where tensors like `x` take the Triton kernels and no gradient is needed."""
    from kernels import _use_triton  # noqa: PLC0415 - kernels/__init__ is the dispatch, imported lazily here

    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ws)):
        return None
    if not _use_triton(x):
        return None
    from kernels import triton_moe  # noqa: PLC0415 - triton only where it runs

    return triton_moe.grouped_mm


def swiglu_triton(rows: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                  w2: torch.Tensor) -> torch.Tensor:
    """The experts' SwiGLU on rows sorted by expert, each matrix one Triton grouped GEMM."""
    from kernels import triton_moe  # noqa: PLC0415

    gate = triton_moe.grouped_mm(rows, counts, w1)
    up = triton_moe.grouped_mm(rows, counts, w3)
    return triton_moe.grouped_mm(F.silu(gate) * up, counts, w2)


def _swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def _swiglu_per_expert(rows: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                       w2: torch.Tensor, row_tile: int | None) -> torch.Tensor:
    out = rows.new_empty(rows.shape[0], w2.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):  # experts, not tokens; a device sync on CUDA (the fallback)
        if not n:
            continue
        seg = rows[start:start + n]
        if row_tile is None:
            out[start:start + n] = _swiglu(seg, w1[e], w3[e], w2[e])
        else:  # every op on whole [row_tile, .] tiles: a row's bits do not depend on its expert's other rows
            seg = F.pad(seg, (0, 0, 0, -n % row_tile))
            tiles = [_swiglu(t, w1[e], w3[e], w2[e]) for t in seg.split(row_tile)]
            out[start:start + n] = torch.cat(tiles)[:n]
        start += n
    return out


def moe_swiglu(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
               w2: torch.Tensor, row_tile: int | None = None) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{idx[n, j]}(x[n]) for x [N,C], idx/weights [N,k]; the experts' SwiGLU
    weights stacked: w1 (gate) and w3 (up) [E,I,C], w2 (down) [E,C,I]. Returns [N,C] in x's dtype.

    `row_tile` (the batch-invariant mode) runs each expert's rows in padded tiles of that many rows, so
    that every GEMM and elementwise op a row goes through has one shape whatever the batch."""
    N, k = idx.shape
    order, counts = sort_by_expert(idx, w1.shape[0])
    rows = x[order // k]  # row r of the sorted layout is token order[r] // k
    # the GEMMs' dtype: autocast's where it is on (it does not cover _grouped_mm), else the weights'
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w1.dtype
    rows = rows.to(dtype)
    if row_tile is None and w1.dtype == dtype and _grouped_mm_usable(rows, w1, w3, w2):
        out = _swiglu_grouped_mm(rows, counts, w1, w3, w2)
    elif row_tile is None and w1.dtype == dtype and rows.is_cuda and _triton_grouped(rows, w1, w3, w2) is not None:
        out = swiglu_triton(rows, counts, w1, w3, w2)
    else:
        out = _swiglu_per_expert(rows, counts, w1, w3, w2, row_tile)
    per_choice = torch.empty_like(out)
    per_choice[order] = out  # back to (token, choice) order
    per_choice = per_choice.view(N, k, -1).float()
    weights = weights.float()
    y = per_choice[:, 0] * weights[:, :1]
    for j in range(1, k):  # in order, elementwise: a token's sum is the same whatever the batch (sum(1) is not)
        y = y + per_choice[:, j] * weights[:, j:j + 1]
    return y.to(x.dtype)
