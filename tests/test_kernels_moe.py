"""The Triton grouped GEMM of the experts (kernels/triton_moe.py) against one matmul per expert, and the
experts' SwiGLU on it against kernels.moe's other paths: odd row counts, unused experts, widths that are
not multiples of the tiles, an empty input.

On CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before it is imported); on a
CUDA machine with TRITON_INTERPRET unset or 0 it runs compiled (bench/gpu_check.sh)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any triton.jit below is decorated
DEVICE = "cuda" if ON_CUDA else "cpu"

pytest.importorskip("triton", reason="triton is not installed (pip install 'tzd[triton]')")

import kernels.moe as moe  # noqa: E402

triton_moe = importlib.import_module("kernels.triton_moe")
if (type(triton_moe._grouped_mm).__name__ == "InterpretedFunction") == ON_CUDA:  # imported with the other mode
    triton_moe = importlib.reload(triton_moe)


def per_expert(rows: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        out.append(rows[start:start + n].double() @ w[e].double().T)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize(("counts", "N", "K"), [
    ([3, 0, 40, 1, 0], 40, 24),  # unused experts, a count over one tile, widths off the tiles
    ([0, 0, 7], 64, 32),
    ([33, 31, 64, 1], 17, 80),  # several tiles per expert; K over one chunk
    ([0, 0, 0, 0], 16, 16),  # nothing routed
])
def test_grouped_mm_matches_one_matmul_per_expert(counts: list[int], N: int, K: int) -> None:
    g = torch.Generator().manual_seed(sum(counts) + N)
    c = torch.tensor(counts)
    rows = torch.randn(int(c.sum()), K, generator=g)
    w = torch.randn(len(counts), N, K, generator=g)
    out = triton_moe.grouped_mm(rows.to(DEVICE), c.to(DEVICE), w.to(DEVICE)).cpu()
    assert out.shape == (int(c.sum()), N)
    if len(rows):
        torch.testing.assert_close(out.double(), per_expert(rows, c, w), atol=1e-3, rtol=1e-4)


def test_experts_swiglu_on_the_kernel_matches_the_loop() -> None:
    """moe_swiglu's rows through swiglu_triton give what the per-expert loop gives (tokens routed with k=2
    to 6 experts, one of them unused)."""
    g = torch.Generator().manual_seed(3)
    N, k, E, C, W = 37, 2, 6, 32, 24
    x = torch.randn(N, C, generator=g)
    idx = torch.randint(0, E - 1, (N, k), generator=g)  # expert E - 1 gets nothing
    w1, w3 = torch.randn(E, W, C, generator=g) * 0.2, torch.randn(E, W, C, generator=g) * 0.2
    w2 = torch.randn(E, C, W, generator=g) * 0.2
    order, counts = moe.sort_by_expert(idx, E)
    rows = x[order // k]
    want = moe._swiglu_per_expert(rows, counts, w1, w3, w2, None)
    got = moe.swiglu_triton(rows.to(DEVICE), counts.to(DEVICE), w1.to(DEVICE), w3.to(DEVICE), w2.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
