"""The checkpoint directory: config.json + model.safetensors + tokenizer.model, written atomically."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tzd.models import ModelConfig, build_model
from tzd.tokenizer import SpecialIds, Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.model"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Tokenizer
    config: dict[str, Any]
    model_config: ModelConfig
    path: Path
    special: SpecialIds = field(default_factory=SpecialIds)

    @property
    def mask_id(self) -> int:
        return self.special.mask

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def save_checkpoint(out_dir: str | Path, model: nn.Module, model_config: ModelConfig,
                    tokenizer_path: str | Path, metadata: dict[str, Any] | None = None,
                    weights_dtype: torch.dtype | None = None, extra_files: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically: build it under a temporary name, then rename into place.

    `extra_files` maps a file name to an object saved with torch.save beside the weights (resume state).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu", weights_dtype or v.dtype).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        config = {
            "format_version": FORMAT_VERSION,
            "model": model_config.to_dict(),
            "weights_dtype": str(weights_dtype or next(iter(state.values())).dtype).replace("torch.", ""),
            **(metadata or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name, obj in (extra_files or {}).items():
            torch.save(obj, tmp / name)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; a checkpoint is served by other users (containers)
        tmp.chmod(0o755)
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, checked for format version and required keys."""
    cfg_path = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a checkpoint needs {CONFIG_FILE}, {WEIGHTS_FILE}, "
                              f"{TOKENIZER_FILE})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: unknown format_version {version!r} (this TZD reads {FORMAT_VERSION})")
    if "model" not in config:
        raise CheckpointError(f"{cfg_path}: no 'model' section")
    return config


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_checkpoint(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Loaded:
    """Load a checkpoint onto `device` (None = CUDA where available, else CPU) in `dtype` (None = fp32)."""
    path = Path(path)
    config = read_config(path)
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: bad 'model' section: {e}") from None
    for name in (WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: unreadable or truncated safetensors ({e})") from None
    try:
        tokenizer = Tokenizer(path / TOKENIZER_FILE)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path / TOKENIZER_FILE}: {e}") from None
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{path / TOKENIZER_FILE}: vocabulary of {tokenizer.vocab_size} exceeds the "
                              f"model's vocab_size {model_config.vocab_size}")
    with torch.device("meta"):
        model = build_model(model_config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: tensors do not match the config "
                              f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{path / WEIGHTS_FILE}: tensor {k} has shape {tuple(state[k].shape)}, "
                                  f"the config implies {tuple(v.shape)}")
    dev = resolve_device(device)
    model = build_model(model_config)  # real buffers (rope tables) need a real device
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model = model.to(device=dev, dtype=dtype or torch.float32).eval()
    model.requires_grad_(False)
    return Loaded(model=model, tokenizer=tokenizer, config=config, model_config=model_config, path=path)
