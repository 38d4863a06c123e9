"""The loaded model and the precision it runs in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tzd.checkpoint import Loaded, load_checkpoint, resolve_device
from tzd.models import count_params

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    loaded: Loaded
    device: torch.device
    weights_dtype: torch.dtype
    params: int

    @property
    def context(self) -> int:
        return self.loaded.model_config.block_size

    @property
    def dtype_name(self) -> str:
        return str(self.weights_dtype).removeprefix("torch.")

    def describe(self) -> str:
        return (f"{self.loaded.path}: {self.params / 1e6:.2f}M params, device {self.device}, dtype {self.dtype_name}, "
                f"context {self.context}, vocab {self.loaded.model_config.vocab_size}, "
                f"{torch.get_num_threads()} CPU threads")


def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 natively (avx512_bf16 / AMX): there bf16 is 2-3x faster than fp32."""
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def choose_precision(device: torch.device, dtype: str) -> torch.dtype:
    """The weights' dtype for --dtype on `device`; every step runs in it."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 weights rather than fp32 ones under bf16 autocast: the same bf16 matmuls without recasting
    # every weight at every step (measured 3-15% per step, the most on short cached steps)
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def load_runtime(checkpoint: str | Path, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None) -> Runtime:
    """Load the checkpoint onto the device in the chosen precision (`threads`: torch's CPU threads)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    weights = choose_precision(dev, dtype)
    loaded = load_checkpoint(checkpoint, device=dev, dtype=weights)
    return Runtime(loaded, dev, weights, count_params(loaded.model))


@contextlib.contextmanager
def inference(runtime: Runtime) -> Iterator[None]:
    """What every step (and the offline baseline) runs under."""
    with torch.inference_mode():
        yield
