"""EngineConfig: the engine core's settings, every unit resolved, built once by whoever serves.

The server builds it from its flags (server.runtime.engine_config: --kv-cache-memory's GiB or percentage
turned into bytes against the device); offline generate() from its arguments. The core reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineConfig"]


@dataclass(frozen=True)
class EngineConfig:
    """Slots, line and budgets of one engine core; sizes in bytes, counts in requests, tokens or positions."""

    max_batch_size: int = 16  # requests denoised together (the batch's slots)
    max_waiting: int = 1 << 30  # requests that may wait in line (the server answers 429 past it)
    max_batched_tokens: int | None = None  # columns one step may run (None: no token budget)
    kv_cache_bytes: int | None = None  # the paged KV cache (None: every slot a whole context)
    kv_page_size: int = 16  # positions per KV page
    prefix_pool_bytes: int = 0  # block-causal models' shared prompt blocks (0: no prefix pool)
    cuda_graphs: bool = False  # replay the cached step from CUDA graphs (CUDA only)

    def __post_init__(self) -> None:
        checks = {"max_batch_size": self.max_batch_size >= 1, "max_waiting": self.max_waiting >= 0,
                  "max_batched_tokens": self.max_batched_tokens is None or self.max_batched_tokens >= 1,
                  "kv_cache_bytes": self.kv_cache_bytes is None or self.kv_cache_bytes >= 0,
                  "kv_page_size": self.kv_page_size >= 1, "prefix_pool_bytes": self.prefix_pool_bytes >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range")
