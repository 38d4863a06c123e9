"""A run's checkpoints: TZD's own directory (config.json, weights, tokenizer) plus the state to resume from.

Weights and optimizer state are saved whole (unsharded, keyed by parameter name) whatever the strategy,
through torch.distributed.checkpoint's get_state_dict/set_state_dict: FSDP shards are gathered to rank 0
on save and re-cut for the current processes on load, so a run saved by N processes resumes on M.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tzd.checkpoint import CheckpointError, read_config, save_checkpoint

if TYPE_CHECKING:
    from trainer.run import Run

STATE_FILE = "training_state.pt"


def machine_description(device: torch.device) -> str:
    """What the run ran on, for the checkpoint's metadata."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}")


def resolve_resume(cfg: DictConfig, out_dir: Path) -> Path | None:
    """The checkpoint `training.resume` names: None (fresh), out_dir/last (auto, when there) or a path."""
    resume = cfg.training.resume
    if resume in (None, "", "none"):
        return None
    path = out_dir / "last" if resume == "auto" else Path(str(resume))
    if resume == "auto" and not (path / STATE_FILE).is_file():
        return None  # nothing to resume yet: start fresh
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"training.resume={resume}: {path / STATE_FILE} not found")
    read_config(path)
    return path


def full_state(run: Run) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model, optimizer) state dicts, whole and on CPU, on rank 0 (others get empty ones). Every rank calls."""
    return get_state_dict(run.model.module, run.optimizer.optimizer,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def keyed_by_name(optimizer_state: dict[str, Any], model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name. Training states written before sharding are keyed
    by position in `optimizer`'s groups (torch's own optimizer.state_dict()); they are renamed here."""
    if not any(isinstance(p, int) for g in optimizer_state["param_groups"] for p in g["params"]):
        return optimizer_state
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in optimizer_state["param_groups"]]}


def restore_state(run: Run, path: Path) -> None:
    """Weights, optimizer, progress and RNG from `path`, so that the run goes on as if never stopped.

    Every process reads the file (memory-mapped: a process touches only the pages of its own shard).
    """
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
    set_state_dict(run.model.module, run.optimizer.optimizer, model_state_dict=saved["model"],
                   optim_state_dict=keyed_by_name(saved["optimizer"], run.model.module, run.optimizer.optimizer),
                   options=StateDictOptions(full_state_dict=True))
    run.state.update(saved["progress"])
    torch.set_rng_state(saved["torch_rng"])


def save_run(run: Run, name: str, metrics: dict[str, float]) -> Path:
    """Write out_dir/<name>: every rank gives its shards, rank 0 writes, every rank waits for it."""
    t, state, fabric = run.cfg.training, run.state, run.fabric
    meta = {
        "backend": run.model_cfg.backend,
        "training": {
            "steps": state["step"], "tokens_seen": state["tokens_seen"], "params": run.n_params,
            "wall_time_s": round(state["wall_time_s"], 1), "precision": run.precision,
            "world_size": fabric.world_size, "machine": machine_description(fabric.device),
            "data": run.corpus.description, "chars_per_token_val": round(run.chars_per_token, 4),
            "validation": metrics, "config": OmegaConf.to_container(run.cfg),
            **({"init_from": run.init_from} if run.init_from else {}),
        },
    }
    path = run.out_dir / name
    try:
        weights, optimizer = full_state(run)
        if fabric.is_global_zero:
            extra = {STATE_FILE: {"model": weights, "optimizer": optimizer, "progress": dict(state),
                                  "torch_rng": torch.get_rng_state()}}
            save_checkpoint(path, weights, run.model_cfg, run.tok_path, meta,
                            weights_dtype=getattr(torch, str(t.save_dtype)), extra_files=extra)
    finally:
        fabric.barrier()  # also when rank 0 failed: the other ranks must not wait for it forever
    return path
