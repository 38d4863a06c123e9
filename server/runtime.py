"""The loaded model and the precision it runs in (weights dtype, CPU bf16 autocast)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tzd.checkpoint import Loaded, load_checkpoint, resolve_device
from tzd.models.invariant import set_batch_invariant
from tzd.quant import QuantConfig, count_weights, weight_bytes
from tzd.sampling.batch import compute_dtype, dense_kv_bytes
from tzd.sampling.config import EngineConfig

if TYPE_CHECKING:
    from server.config import ServerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    loaded: Loaded
    device: torch.device
    weights_dtype: torch.dtype  # of embeddings and norms; linear layers are stored in autocast_dtype if set
    autocast_dtype: torch.dtype | None  # CPU autocast around every step; None = run in the weights' dtype
    params: int
    deterministic: bool = False  # the batch-invariant path (tzd.models.invariant): text independent of the load
    weight_bytes: int = 0  # of the weights as held (quantized ones at their packed size)

    @property
    def quantization(self) -> str | None:
        """int8, int4-g64, fp8 (+head), or None for float weights."""
        q = self.loaded.quantization
        return q.name if q is not None else None

    @property
    def context(self) -> int:
        return self.loaded.model_config.context_len

    @property
    def dtype_name(self) -> str:
        w = str(self.weights_dtype).removeprefix("torch.")
        if self.autocast_dtype is None:
            return w
        a = str(self.autocast_dtype).removeprefix("torch.")
        return f"{w}+{a}-linear+autocast-{a}"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context each step runs in: bf16 autocast on CPU where chosen (thread-local, so per step)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def model_size(self) -> dict[str, int | None]:
        """clients.protocol.ModelSize's fields: parameters, active ones, routed experts (of a MoE model)."""
        cfg = self.loaded.model_config
        moe = bool(cfg.n_experts)
        return {"parameters": self.params, "active_parameters": self.params - cfg.unrouted_params(),
                "experts": cfg.n_experts if moe else None,
                "experts_per_token": cfg.n_experts_per_token if moe else None}

    def describe(self) -> str:
        cfg = self.loaded.model_config
        experts = (f" ({(self.params - cfg.unrouted_params()) / 1e6:.2f}M active: {cfg.n_experts_per_token} of "
                   f"{cfg.n_experts} experts)") if cfg.n_experts else ""
        return (f"{self.loaded.path}: {self.params / 1e6:.2f}M params{experts}, device {self.device}, "
                f"dtype {self.dtype_name}, "
                f"quantization {self.quantization or 'none'} ({self.weight_bytes / 2**20:.1f} MiB of weights), "
                f"context {self.context}, vocab {self.loaded.model_config.vocab_size}, "
                f"{torch.get_num_threads()} CPU threads, deterministic {'on' if self.deterministic else 'off'}")


def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 natively (avx512_bf16 / AMX): there bf16 autocast beats fp32 (bench/train.json,
    bench/serve.py)."""
    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def choose_precision(device: torch.device, dtype: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype) for --dtype on `device`."""
    if dtype != "auto":
        return DTYPES[dtype], None
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
    # bf16 autocast over fp32 weights: the matmuls in bf16, the residual stream and elementwise ops in
    # fp32 (all-bf16 weights are slower per row at batch 16: bf16 elementwise ops are slow on CPU).
    # load_runtime stores the linear layers in bf16 so that autocast need not cast them at every call.
    return torch.float32, (torch.bfloat16 if cpu_has_bf16() else None)


def load_runtime(checkpoint: str | Path, device: str = "auto", dtype: str = "auto",
                 threads: int | None = None, max_model_len: int | None = None,
                 deterministic: bool = False, quantization: QuantConfig | None = None) -> Runtime:
    """Load the checkpoint onto the device in the chosen precision (`threads`: torch's CPU threads;
    `max_model_len`: the most positions, prompt + generated, one request may use; `deterministic`:
    the batch-invariant path, so that a request's tokens do not depend on what it is batched with;
    `quantization`: the linear layers' and experts' weights quantized as they load, tzd.quant)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    weights, autocast = choose_precision(dev, dtype)
    # linear layers go straight to the autocast dtype: a public 8B model never exists in fp32 first
    loaded = load_checkpoint(checkpoint, device=dev, dtype=weights, linear_dtype=autocast, max_context=max_model_len,
                             quantization=quantization)
    set_batch_invariant(loaded.model, deterministic)
    return Runtime(loaded, dev, weights, autocast, count_weights(loaded.model), deterministic,
                   weight_bytes(loaded.model))


@contextlib.contextmanager
def inference(runtime: Runtime) -> Iterator[None]:
    """inference_mode + the runtime's autocast: what every step (and the offline baseline) runs under."""
    with torch.inference_mode(), runtime.autocast():
        yield


def engine_config(cfg: ServerConfig, runtime: Runtime) -> EngineConfig:
    """The engine core's settings from the server's flags, every unit resolved once (--kv-cache-memory's
    GiB or percentage against this device, --prefix-cache-mb in bytes)."""
    mc, model = runtime.loaded.model_config, runtime.loaded.model
    dense = dense_kv_bytes(mc, cfg.max_batch_size, cfg.kv_page_size, compute_dtype(model))
    return EngineConfig(max_batch_size=cfg.max_batch_size, max_waiting=cfg.max_queue,
                        max_batched_tokens=cfg.max_num_batched_tokens,
                        kv_cache_bytes=kv_cache_bytes(cfg.kv_cache_memory, runtime.device, dense),
                        kv_page_size=cfg.kv_page_size, prefix_pool_bytes=int(cfg.prefix_cache_mb * (1 << 20)),
                        cuda_graphs=cfg.cuda_graphs == "on")


def kv_cache_bytes(memory: str | None, device: torch.device, dense_bytes: int) -> int:
    """Bytes for the paged KV cache from --kv-cache-memory: GiB ("2", "0.25") or a percentage of the free
    device memory ("40%"); None: `dense_bytes` (every slot a whole context), on CUDA at most half the
    free memory. (GiB and a fraction told apart by magnitude would make a cache under 1 GiB unaskable.)"""
    if memory is None:
        return min(dense_bytes, free_memory(device) // 2) if device.type == "cuda" else dense_bytes
    if memory.endswith("%"):
        return int(float(memory[:-1]) / 100 * free_memory(device))
    return int(float(memory) * (1 << 30))


def free_memory(device: torch.device) -> int:
    """Free bytes on `device`: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
