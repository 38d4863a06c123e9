"""Batch invariance: a row's logits do not depend on the other rows of its batch, in any precision.

A batched step flattens B rows of T columns into B*T GEMM rows and pads every row to the batch's
longest keys. The libraries pick their GEMM and attention kernels (and so the order in which a
dot product is summed) from those shapes, so the same request can get other logits, in the last
bits, alone than beside others; at temperature 0 a flipped near-tie then changes the text.
Measured on the default model (2-core AVX2 CPU without bf16 units, torch 2.13): in bf16 autocast
4 of 16 mixed requests got another text at batch 16 than alone. The per-op probe (python -m
bench.invariance) finds the attention to be the first op that differs, in bf16 and in fp32 alike
(SDPA's exp-sum tail and key split follow the padded key length: 44 keys padded to 48 already
change a row); the linear layers on that CPU kept rows equal in bf16 but not in fp32 for M <= 3
(MKL's small-M path), and CPUs with bf16 units (oneDNN) and cuBLAS choose GEMM kernels by M.

`set_batch_invariant(model)` makes every per-row reduction independent of the batch:
- each nn.Linear runs its rows in fixed tiles of ROW_TILE (the last tile padded), so every GEMM
  the library sees has the same shape [ROW_TILE, K] x [K, N] whatever the batch (no shape-chosen
  kernel, no split-K chosen by M);
- attention goes through kernels.attention(invariant=True): one fixed path, keys reduced in
  fixed-size chunks in order (kernels.invariant; on CUDA the Triton kernel with one fixed tile);
- norms are per row already (RMSNorm's mean over the hidden size has one shape);
- quantized linear layers (tzd.quant) run their packed matmuls over the same row tiles.
It is the scheme of vLLM's batch-invariant mode and SGLang's deterministic inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows per GEMM tile. 32 keeps the padding of a small step (a dual-cache block of one request is
# 32 rows) at nothing while a large step's loop stays short; the cost is in bench/invariance.py.
ROW_TILE = 32


def tiled_rows(fn: Callable[[torch.Tensor], torch.Tensor], x2: torch.Tensor, rows: int = ROW_TILE) -> torch.Tensor:
    """fn over fixed tiles of `rows` rows of x2 [M, K] (the last tile zero-padded): every row's output is
    computed by the same GEMM shape, whatever M is."""
    M = x2.shape[0]
    pad = -M % rows
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    return torch.cat([fn(tile) for tile in x2.split(rows)])[:M]


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 rows: int = ROW_TILE) -> torch.Tensor:
    """F.linear over fixed tiles of `rows` rows: every row's output is computed by the same GEMM shape."""
    out = tiled_rows(lambda tile: F.linear(tile, weight, bias), x.reshape(-1, x.shape[-1]), rows)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class InvariantLinear(nn.Linear):
    """nn.Linear whose rows go through `tiled_linear`: same parameters and state dict, batch-invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_linear(x, self.weight, self.bias)


def set_batch_invariant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch `model` (either backend) to the batch-invariant path, or back to the libraries' fastest.

    Linear layers change class in place (InvariantLinear adds no state: weights, names and tied
    parameters stay), and every module with a `batch_invariant` attribute (the attention) gets the flag.
    """
    for module in model.modules():
        if type(module) in (nn.Linear, InvariantLinear):
            module.__class__ = InvariantLinear if enabled else nn.Linear
        if hasattr(module, "batch_invariant"):
            module.batch_invariant = enabled
    model.tzd_batch_invariant = enabled
    return model


def is_batch_invariant(model: nn.Module) -> bool:
    return bool(getattr(model, "tzd_batch_invariant", False))
