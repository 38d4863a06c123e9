"""A run's checkpoints: TZD's own directory (config.json, weights, tokenizer) plus the state to resume from."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

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


def restore_state(run: Run, path: Path) -> None:
    """Weights, optimizer, progress and RNG from `path`, so that the run goes on as if never stopped."""
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.state.update(saved["progress"])
    torch.set_rng_state(saved["torch_rng"])


def save_run(run: Run, name: str, metrics: dict[str, float]) -> Path:
    """Write out_dir/<name> (rank 0 writes; every rank waits for it)."""
    t, state, fabric = run.cfg.training, run.state, run.fabric
    meta = {
        "backend": run.model_cfg.backend,
        "training": {
            "steps": state["step"], "tokens_seen": state["tokens_seen"], "params": run.n_params,
            "wall_time_s": round(state["wall_time_s"], 1), "precision": run.precision,
            "world_size": fabric.world_size, "machine": machine_description(fabric.device),
            "data": run.corpus.description, "chars_per_token_val": round(run.chars_per_token, 4),
            "validation": metrics, "config": OmegaConf.to_container(run.cfg),
        },
    }
    extra: dict[str, Any] = {
        STATE_FILE: {"model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
                     "optimizer": run.optimizer.state_dict(), "progress": dict(state),
                     "torch_rng": torch.get_rng_state()}}
    path = run.out_dir / name
    try:
        if fabric.is_global_zero:
            save_checkpoint(path, run.model, run.model_cfg, run.tok_path, meta,
                            weights_dtype=getattr(torch, str(t.save_dtype)), extra_files=extra)
    finally:
        fabric.barrier()  # also when rank 0 failed: the other ranks must not wait for it forever
    return path
