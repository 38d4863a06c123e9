"""Weight-only quantized linear layers: y = x W^T + b with W held as int8, packed int4 or fp8 e4m3.

The matmuls are torch's own (no extension to build): `_weight_int8pack_mm` (int8 weights, per-channel
scales), `_weight_int4pack_mm_for_cpu` / `_weight_int4pack_mm` (tinygemm's packed int4 with group-wise
scales and zero points) and `_scaled_mm` (fp8 tensor cores, activations quantized per row on the fly).
The packed int4 layout is specific to the device it was packed on, so a layer is quantized where it runs.
Shapes the kernels do not take (an int4 output count not a multiple of 16, an input count not a multiple
of the group) are zero-padded at quantization time; the padded input columns meet zero activations.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tzd.models.invariant import tiled_rows
from tzd.quant import formats

INT4_ROWS = 16  # the CPU packer takes N % 16 == 0 (CUDA's needs 8)
FP8_TILE = 16  # _scaled_mm wants K and N multiples of 16
# _weight_int8pack_mm on the CPU crashed (torch 2.13, bf16 activations) for K not a multiple of 16;
# such a layer dequantizes instead (no real model has one)
INT8_K_MULTIPLE = 16
# torch's packed CPU kernels in fp32 are scalar loops, over an order of magnitude slower than dequantize +
# fp32 matmul (int8) or the bf16 kernel (int4): so fp32 int8 layers dequantize, and int4 layers compute in
# bf16 on the CPU whatever the model's dtype (bench/quant.py times the layers as served).
PACKED_DTYPES = (torch.bfloat16, torch.float16)


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether this torch build has aten::`op` for the device type (a CPU wheel has no CUDA kernels)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", device.type.upper())


class QuantizedLinear(nn.Module):
    """What every quantized layer shares: flatten to rows, pad the inputs, the matmul, unpad, bias.

    The tensors are non-persistent buffers: a quantized model is made at load time from a float
    checkpoint and never saved, so its state_dict holds only its float tensors. `batch_invariant`
    (set by tzd.models.invariant.set_batch_invariant) runs the matmul over fixed row tiles."""

    def __init__(self, in_features: int, out_features: int, padded_in: int, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.padded_in, self.dtype = in_features, out_features, padded_in, dtype
        self.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)
        self.batch_invariant = False

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """[M, padded_in] in self.dtype -> [M, >= out_features]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        y = tiled_rows(self.matmul, x2) if self.batch_invariant else self.matmul(x2)
        y = y[:, :self.out_features].to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


class Int8Linear(QuantizedLinear):
    """int8 weights, one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        N, K = weight.shape
        super().__init__(K, N, K, bias, dtype)
        q, scale = formats.in_row_chunks(formats.int8_rows, weight)
        self.register_buffer("weight_int8", q, persistent=False)
        self.register_buffer("scale", scale.to(dtype), persistent=False)
        self.packed = (has_kernel("_weight_int8pack_mm", weight.device) and K % INT8_K_MULTIPLE == 0
                       and (dtype in PACKED_DTYPES or weight.device.type != "cpu"))

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
        return F.linear(x2, self.weight_int8.to(x2.dtype)) * self.scale


class Int4Linear(QuantizedLinear):
    """int4 weights in tinygemm's packed layout, a scale and zero point per `group` inputs of each output."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, group: int) -> None:
        N, K = weight.shape
        w = formats.pad_to(weight, INT4_ROWS, group)
        super().__init__(K, N, w.shape[1], bias, dtype)
        self.group = group
        self.cuda = weight.device.type == "cuda"
        # CUDA's kernel takes bf16 activations only; the CPU's is slow in fp32 (PACKED_DTYPES)
        self.kernel_dtype = dtype if not self.cuda and dtype in PACKED_DTYPES else torch.bfloat16
        if not self.cuda and not has_kernel("_convert_weight_to_int4pack_for_cpu", weight.device):
            raise ValueError(f"int4 weights: no packed int4 kernel for {weight.device.type} in this torch build")
        Kp = w.shape[1]
        inner_k_tiles = 8 if Kp % 128 == 0 else 4 if Kp % 64 == 0 else 2  # tinygemm: K % (tiles * 16) == 0

        def quantize_and_pack(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, scale, zero = formats.int4_groups(rows, group)
            if self.cuda:
                return (torch._convert_weight_to_int4pack(formats.nibbles_pack(q).contiguous(), inner_k_tiles),
                        scale, zero)
            return torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1), scale, zero

        packed, scale, zero = formats.in_row_chunks(quantize_and_pack, w)
        # [K/group, N, 2]: (scale, zero) per group and output channel, the kernels' layout
        scales_and_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("weight_int4", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(self.kernel_dtype), persistent=False)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(self.kernel_dtype).contiguous()
        if self.cuda:
            return torch._weight_int4pack_mm(x2, self.weight_int4, self.group, self.scales_and_zeros)
        return torch._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


class Fp8Linear(QuantizedLinear):
    """fp8 e4m3 weights with one scale per output channel; activations scaled per row to e4m3 at each call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        N, K = weight.shape
        w = formats.pad_to(weight, FP8_TILE, FP8_TILE)
        super().__init__(K, N, w.shape[1], bias, dtype)
        q, scale = formats.in_row_chunks(formats.fp8_rows, w)
        self.register_buffer("weight_fp8", q, persistent=False)
        self.register_buffer("scale", scale[None, :].contiguous(), persistent=False)  # [1, N] fp32

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x_scale = (x2.abs().amax(dim=-1, keepdim=True).float() / formats.FP8_MAX).clamp(min=1e-12)
        xq = (x2.float() / x_scale).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.scale,
                                out_dtype=torch.bfloat16)


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, method: str, group: int,
                    dtype: torch.dtype) -> QuantizedLinear:
    """The quantized layer of `weight` [out, in] (and `bias`) on weight's device, computing in `dtype`."""
    if method == "int8":
        return Int8Linear(weight, bias, dtype)
    if method == "int4":
        return Int4Linear(weight, bias, dtype, group)
    if method == "fp8":
        return Fp8Linear(weight, bias, dtype)
    raise ValueError(f"quantization {method!r}: must be int8, int4 or fp8")
