"""Model backends behind one interface: model(ids [B,T], ctx=None) -> logits [B,T,V]."""

from __future__ import annotations

import torch
import torch.nn as nn

from tzd.models.config import BACKENDS, ModelConfig
from tzd.models.context import ForwardContext

__all__ = ["BACKENDS", "ForwardContext", "ModelConfig", "build_model", "count_params", "linear_modules",
           "linear_weights_to", "model_config"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of the configured backend."""
    if cfg.backend == "smdm":
        from tzd.models.smdm import SMDM

        return SMDM(cfg)
    if cfg.backend == "litgpt":
        from tzd.models.litgpt_bidir import BidirectionalGPT

        return BidirectionalGPT(cfg)
    raise ValueError(f"model.backend={cfg.backend!r}: must be one of {', '.join(BACKENDS)}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_config(model: nn.Module) -> ModelConfig:
    """The ModelConfig of a model built here, also through wrappers (Fabric, DDP) that keep it in `.module`."""
    inner = model
    while not isinstance(getattr(inner, "tzd_config", None), ModelConfig) and hasattr(inner, "module"):
        inner = inner.module
    cfg = getattr(inner, "tzd_config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{type(model).__name__} is not a TZD model (no tzd_config)")
    return cfg


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose weights are GEMM weights: nn.Linear and the stacked experts."""
    from tzd.models.moe import Experts  # noqa: PLC0415 - smdm imports this package

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))]


def linear_weights_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the weights of every nn.Linear (and stacked expert) in `dtype`, the rest (embeddings, norms,
    the router) as they are.

    For inference under autocast to `dtype`: autocast would otherwise cast each fp32 weight again at
    every call (on CPU it cost 11-15% of a dual-cache step). The result is the same: that cast is a rounding.
    """
    for _, module in linear_modules(model):
        module.to(dtype)
    return model
