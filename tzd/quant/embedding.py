"""A quantized token embedding: the rows a step looks up are dequantized, the table stays quantized.

int8 and fp8 keep one scale per row; int4 keeps its nibbles two to a byte with a scale and zero point per
group of each row (its own simple packing: a lookup gathers whole rows, no matmul kernel reads them).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tzd.quant import formats


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's lookup over a quantized table; rows come out in `dtype`."""

    def __init__(self, weight: torch.Tensor, method: str, group: int, dtype: torch.dtype,
                 int8_table: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`int8_table`: the (q, scale) of an int8 head tied to this embedding, shared instead of a second copy."""
        super().__init__()
        V, D = weight.shape
        self.num_embeddings, self.embedding_dim, self.method, self.dtype = V, D, method, dtype
        self.tied = False  # made from the same weight as a quantized head (Quantizer sets it)
        if method == "int4":
            w = formats.pad_to(weight, 1, group)
            table, scale, zero = formats.in_row_chunks(lambda rows: formats.int4_nibble_rows(rows, group), w)
            self.register_buffer("table", table, persistent=False)
            self.register_buffer("scale", scale.to(dtype), persistent=False)
            self.register_buffer("zero", zero.to(dtype), persistent=False)
            return
        q, scale = int8_table if int8_table is not None else formats.in_row_chunks(
            formats.int8_rows if method == "int8" else formats.fp8_rows, weight)
        self.register_buffer("table", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # gathered as bytes: index kernels do not all take float8 tensors
        fp8 = self.table.dtype == torch.float8_e4m3fn
        rows = F.embedding(ids, self.table.view(torch.uint8) if fp8 else self.table)
        if fp8:
            rows = rows.view(torch.float8_e4m3fn)
        if self.method == "int4":
            q = formats.nibbles_unpack(rows)
            w = formats.int4_dequantize(q, self.scale[ids], self.zero[ids])
            return w[..., :self.embedding_dim].to(self.dtype)
        return (rows.to(self.dtype) * self.scale[ids][..., None].to(self.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.method}, dtype={self.dtype}"
