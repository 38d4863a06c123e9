"""The checkpoint directory: config.json + model.safetensors + tokenizer.model, written atomically.

load_checkpoint also reads the public families' Hugging Face layout (tzd.hf): one call for both."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tzd.models import ModelConfig, build_model
from tzd.quant import QuantConfig, as_quant_config, check_device, quantize_model
from tzd.tokenizer import SpecialIds, Tokenizer

if TYPE_CHECKING:
    from tzd.hf.tokenizer import HFTokenizer

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.model"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Tokenizer | HFTokenizer
    config: dict[str, Any]
    model_config: ModelConfig
    path: Path
    special: SpecialIds = field(default_factory=SpecialIds)
    quantization: QuantConfig | None = None

    @property
    def mask_id(self) -> int:
        return self.special.mask


def save_checkpoint(out_dir: str | Path, model: nn.Module | Mapping[str, torch.Tensor], model_config: ModelConfig,
                    tokenizer_path: str | Path, metadata: dict[str, Any] | None = None,
                    weights_dtype: torch.dtype | None = None, extra_files: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically: build it under a temporary name, then rename into place.

    `model` is the module or its full state dict (what a sharded trainer gathers). `extra_files` maps a
    file name to an object saved with torch.save beside the weights (resume state).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu", weights_dtype or v.dtype).contiguous()
                 for k, v in (model.state_dict() if isinstance(model, nn.Module) else model).items()}
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


def check_checkpoint(path: str | Path) -> None:
    """Fail fast (CheckpointError) on a directory neither format can load, before anything heavy starts."""
    from tzd.hf import family_of, is_hf_checkpoint
    from tzd.hf.families import FamilyConfigError

    if Path(path).is_dir() and is_hf_checkpoint(path):
        cfg_path = Path(path) / CONFIG_FILE
        try:
            family_of(json.loads(cfg_path.read_text()))
        except FamilyConfigError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        return
    read_config(path)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_checkpoint(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, linear_dtype: torch.dtype | None = None,
                    max_context: int | None = None, quantization: str | QuantConfig | None = None) -> Loaded:
    """Load a checkpoint onto `device` (None = CUDA where available, else CPU) in `dtype` (None = fp32).

    TZD's own directories and the Hugging Face layout of LLaDA and Dream (config.json with a
    `model_type`) alike. `linear_dtype`: store the linear layers' weights in this dtype instead (CPU
    serving under bf16 autocast); `max_context`: serve at most this many positions (a public model's
    own context can be far longer than its KV store should reserve); `quantization`: int8, int4 or fp8
    (or a QuantConfig: group size, head and embeddings too) for the linear layers' and experts' weights
    (tzd.quant).
    A public family's tensors are quantized one by one as they are read, so no float copy of the whole
    model exists; TZD's own (small) checkpoints are loaded in float, then quantized layer by layer."""
    path = Path(path)
    from tzd.hf import is_hf_checkpoint, load_hf_checkpoint
    from tzd.hf.loader import HFCheckpointError

    quant = as_quant_config(quantization)
    dev = resolve_device(device)
    if quant is not None:
        check_device(quant, dev)  # before anything is read: fp8 off a capable GPU is refused at once
    if path.is_dir() and is_hf_checkpoint(path):
        try:
            model, tok, hf_config, model_config, special = load_hf_checkpoint(
                path, dev, dtype, linear_dtype, max_context, quant)
        except HFCheckpointError as e:
            raise CheckpointError(str(e)) from None
        return Loaded(model=model, tokenizer=tok, config=hf_config, model_config=model_config, path=path,
                      special=special, quantization=quant)
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
    if max_context is not None:
        model_config.context_len = min(model_config.context_len, max_context)
    model = build_model(model_config)  # real buffers (rope tables) need a real device
    model.load_state_dict({k: v.float() for k, v in state.items()})
    del state
    model = model.to(device=dev, dtype=dtype or torch.float32).eval()
    if linear_dtype is not None:
        from tzd.models import linear_weights_to

        linear_weights_to(model, linear_dtype)
    model.requires_grad_(False)
    if quant is not None:
        quantize_model(model, quant, linear_dtype or dtype or torch.float32, dtype or torch.float32)
    return Loaded(model=model, tokenizer=tokenizer, config=config, model_config=model_config, path=path,
                  quantization=quant)
