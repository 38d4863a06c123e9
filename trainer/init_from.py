"""training.init_from=DIR: start a run from another checkpoint's weights (BD3-LM's recipe: a block-diffusion
model fine-tuned from a masked-diffusion one), with the new run's own optimizer, schedule and step 0.

Only the weights come across. Shapes must match (the widths, layers and vocabulary are the checkpoint's;
what may differ is everything that has no tensor: attention kind, diffusion block, context length,
the data). The tokenizer is the checkpoint's unless tokenizer.path names one with the same vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tzd.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, CheckpointError, read_config

SHAPE_KEYS = ("backend", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "vocab_size")


def init_source(init_from: str) -> Path:
    """The checkpoint directory training.init_from names, checked before anything heavy starts."""
    path = Path(init_from)
    try:
        read_config(path)
    except CheckpointError as e:
        raise CheckpointError(f"training.init_from={init_from}: {e}") from None
    for name in (WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"training.init_from={init_from}: {path / name} missing")
    return path


def load_init_weights(model: torch.nn.Module, path: Path, model_config: dict[str, Any]) -> dict[str, Any]:
    """Copy the checkpoint's weights into `model` (before Fabric wraps it); returns what to record of the
    source. A mismatch names the tensor and the config keys that differ."""
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"training.init_from={path}: {path / WEIGHTS_FILE} unreadable ({e})") from None
    source = read_config(path)
    differ = [f"model.{k}={model_config.get(k)} here, {source['model'].get(k)} there" for k in SHAPE_KEYS
              if None not in (source["model"].get(k), model_config.get(k)) and source["model"][k] != model_config[k]]
    expected = model.state_dict()
    for name, tensor in expected.items():
        got = state.get(name)
        if got is None or tuple(got.shape) != tuple(tensor.shape):
            shape = "missing" if got is None else f"shaped {tuple(got.shape)}"
            raise CheckpointError(f"training.init_from={path}: tensor {name} is {shape}, this model needs "
                                  f"{tuple(tensor.shape)}" + (f" ({'; '.join(differ)})" if differ else ""))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"training.init_from={path}: tensors this model does not have: {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name].to(tensor.dtype))
    training = source.get("training", {})
    return {"path": str(path), "steps": training.get("steps"), "tokens_seen": training.get("tokens_seen"),
            "attention": source["model"].get("attention", "bidirectional")}
