"""What to quantize and how: the method, the int4 group size, whether the head and embeddings go too."""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZATIONS = ("int8", "int4", "fp8")
GROUP_SIZES = (32, 64, 128, 256)  # int4 groups: powers of two the packed kernels tile by
DEFAULT_GROUP_SIZE = 64
FP8_CAPABILITY = (8, 9)  # e4m3 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards


class QuantizationError(ValueError):
    """A quantization that cannot run here or with these settings; the message names the setting."""


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of a model's linear layers and mixture-of-experts weights.

    method: int8 (one scale per output channel), int4 (a scale and zero point per `group_size` inputs of
    each output channel) or fp8 (e4m3, one scale per output channel, CUDA sm_89+ only); the experts' stacks
    alike, every expert's output rows with their own scales. `head`: the output head and the token embeddings
    too (on a small model they are a large share of the bytes)."""

    method: str
    group_size: int = DEFAULT_GROUP_SIZE
    head: bool = False

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATIONS:
            raise QuantizationError(f"quantization={self.method!r}: must be one of {', '.join(QUANTIZATIONS)}")
        if self.group_size not in GROUP_SIZES:
            raise QuantizationError(f"quantization group size {self.group_size}: must be one of "
                                    f"{', '.join(map(str, GROUP_SIZES))}")

    @property
    def name(self) -> str:
        """int8, int4-g64, fp8, with +head where the head and embeddings are quantized too."""
        base = f"int4-g{self.group_size}" if self.method == "int4" else self.method
        return base + ("+head" if self.head else "")


def as_quant_config(quantization: str | QuantConfig | None) -> QuantConfig | None:
    """None, a method name (default group size, head kept) or a QuantConfig."""
    if quantization is None or isinstance(quantization, QuantConfig):
        return quantization
    return QuantConfig(method=quantization)


def check_device(cfg: QuantConfig, device: torch.device) -> None:
    """Refuse fp8 where the device has no e4m3 matmul (the CPU, CUDA before sm_89)."""
    if cfg.method != "fp8":
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise QuantizationError(f"quantization=fp8 needs a CUDA GPU of compute capability >= 8.9; the device "
                                f"is {device} (use int8 or int4 there)")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise QuantizationError(f"quantization=fp8 needs compute capability >= 8.9; {device} has "
                                f"{capability[0]}.{capability[1]} (use int8 or int4 there)")
