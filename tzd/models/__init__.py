"""Model backends behind one interface: model(ids [B,T], ctx=None) -> logits [B,T,V]."""

from __future__ import annotations

import torch.nn as nn

from tzd.models.config import BACKENDS, ModelConfig
from tzd.models.context import ForwardContext

__all__ = ["BACKENDS", "ForwardContext", "ModelConfig", "build_model", "count_params"]


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
