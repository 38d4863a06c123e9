"""Quantized mixture-of-experts weights: tzd.models.moe.Experts with its stacked w1/w3/w2 held as int8, int4 or
fp8, each forward dequantizing only the experts its tokens were routed to.

Each of w1, w3 [E, W, C] and w2 [E, C, W] becomes a QuantizedStack of a float stack [E, N, K] (E experts, N
output rows, K inputs), in the formats of tzd.quant.formats applied to the E*N rows, so that every output
row of every expert has its own scale:

    method  q                                   scale               zero
    int8    int8 [E, N, K]                      [E, N]              -
    int4    uint8 [E, N, Kp/2] (two nibbles)    [E, N, Kp/group]    [E, N, Kp/group]
    fp8     float8_e4m3fn [E, N, K]             [E, N]              -

(Kp: K zero-padded to a multiple of the group; the padded columns are cut off after dequantizing.) Scales
and zero points are in the compute dtype, as the quantized linear layers keep theirs.

There is no packed grouped kernel for these formats in torch, so the product is kernels.moe.moe_swiglu's,
the float path's own, on the chosen experts dequantized to the compute dtype for that one call: the float
copy is of the experts a step uses, for the length of one layer's forward, never of all of them kept.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import kernels.moe
from tzd.models.invariant import ROW_TILE
from tzd.quant import formats


class QuantizedStack(nn.Module):
    """One stacked expert matrix [E, N, K] quantized (the table in the module doc); `dequantize(ids)` gives
    float rows of experts `ids` only. Buffers are non-persistent, as the quantized linear layers' are: a
    quantized model is made from a float checkpoint and never saved."""

    def __init__(self, w: torch.Tensor, method: str, group: int, dtype: torch.dtype) -> None:
        super().__init__()
        E, N, K = w.shape
        self.shape, self.method, self.dtype = (E, N, K), method, dtype
        rows = w.reshape(E * N, K)
        if method == "int4":
            q, scale, zero = formats.in_row_chunks(lambda r: formats.int4_nibble_rows(r, group),
                                                   formats.pad_to(rows, 1, group))
            self.register_buffer("zero", zero.view(E, N, -1).to(dtype), persistent=False)
            scale = scale.view(E, N, -1)
        elif method in ("int8", "fp8"):
            q, scale = formats.in_row_chunks(formats.int8_rows if method == "int8" else formats.fp8_rows, rows)
            scale = scale.view(E, N)
        else:
            raise ValueError(f"quantization {method!r}: must be int8, int4 or fp8")
        self.register_buffer("q", q.view(E, N, -1), persistent=False)
        self.register_buffer("scale", scale.to(dtype), persistent=False)

    def dequantize(self, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids), N, K] in self.dtype: the float weights of experts `ids` (a 1-D long tensor)."""
        fp8 = self.q.dtype == torch.float8_e4m3fn
        # gathered as bytes: index kernels do not all take float8 tensors (as in QuantizedEmbedding)
        q = self.q.view(torch.uint8)[ids].view(torch.float8_e4m3fn) if fp8 else self.q[ids]
        scale = self.scale[ids]
        if self.method == "int4":
            w = formats.int4_dequantize(formats.nibbles_unpack(q), scale, self.zero[ids])
            return w[..., :self.shape[2]].to(self.dtype)
        return q.to(self.dtype) * scale[..., None]

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, method={self.method}, dtype={self.dtype}"


class QuantizedExperts(nn.Module):
    """Experts' forward over quantized stacks: what Experts computes with w1, w3, w2 dequantized."""

    def __init__(self, w1: QuantizedStack, w3: QuantizedStack, w2: QuantizedStack) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = w1, w3, w2
        self.batch_invariant = False  # set by tzd.models.invariant.set_batch_invariant

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if idx.numel() == 0:
            return torch.zeros_like(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # how many experts were chosen is a host value (torch.unique syncs): a graph cannot hold it, so refuse
            # the capture cleanly (tzd.sampling.cuda_graphs then runs the step eagerly) rather than sync inside it
            raise RuntimeError("quantized experts dequantize the experts a step chose: not capturable in a CUDA graph")
        # the chosen experts, ascending, and each choice renumbered to its place among them: the renumbering
        # keeps the experts' order, so moe_swiglu sorts the rows as it would with all experts (the same
        # per-expert segments and tiles: batch-invariant mode gives the bits a float model of these weights does)
        used = torch.unique(idx)
        local = torch.searchsorted(used, idx)
        row_tile = ROW_TILE if self.batch_invariant else None
        return kernels.moe.moe_swiglu(x, local, weights, self.w1.dequantize(used), self.w3.dequantize(used),
                                      self.w2.dequantize(used), row_tile=row_tile)

    def extra_repr(self) -> str:
        return f"experts={self.w1.shape[0]}, method={self.w1.method}"
