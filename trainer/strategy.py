"""training.strategy as a Lightning Fabric strategy.

Every name Fabric knows (auto, ddp, ...) passes through. `fsdp` shards the model, its gradients and its
optimizer state over all processes with PyTorch's FSDP2 (`fully_shard`, one unit per transformer block, so
that only one block's weights are gathered at a time) through Fabric's ModelParallelStrategy. That is
Fabric's FSDP2 route; its older FSDPStrategy (FSDP1) refuses CPUs, where FSDP2 runs over gloo, so the one
code path that serves GPUs is also the one the CPU tests exercise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn
from lightning.fabric.strategies import ModelParallelStrategy, Strategy
from omegaconf import DictConfig, ListConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

SHARDED = "fsdp"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a TZD model (either backend): FSDP's units."""
    from litgpt.model import Block as LitGPTBlock

    from tzd.models.smdm import Block as SMDMBlock

    return [m for m in model.modules() if isinstance(m, (SMDMBlock, LitGPTBlock))]


def shard_blocks(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 over the data-parallel mesh: each block its own unit, the rest (embeddings, head) the root's."""
    from torch.distributed.fsdp import fully_shard

    data_parallel = mesh["data_parallel"]
    for block in transformer_blocks(model):
        fully_shard(block, mesh=data_parallel)
    fully_shard(model, mesh=data_parallel)
    return model


def devices_per_node(devices: object) -> int:
    if isinstance(devices, bool):
        raise ValueError(f"training.devices={devices}: must be a device count or a list of device ids")
    if isinstance(devices, int) and devices >= 1:
        return devices
    if isinstance(devices, (list, tuple, ListConfig)) and len(devices) >= 1:
        return len(devices)
    raise ValueError(f"training.devices={devices}: training.strategy={SHARDED} needs the number of devices "
                     "per node (e.g. training.devices=8) or their ids")


def make_strategy(t: DictConfig) -> str | Strategy:
    name = str(t.strategy)
    if name != SHARDED:
        return name
    world = devices_per_node(t.devices) * int(t.num_nodes)
    return ModelParallelStrategy(parallelize_fn=shard_blocks, data_parallel_size=world, tensor_parallel_size=1)


def is_sharded(strategy: Strategy) -> bool:
    """Whether each process holds only a shard of the weights (a forward pass then needs every process)."""
    return isinstance(strategy, ModelParallelStrategy)
