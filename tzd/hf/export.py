"""Write an SMDM model in a family's Hugging Face layout (config.json + safetensors, sharded or not).

The inverse of tzd.hf.loader: fused tensors are split back into the family's own (q, k, v; stacked
experts into one tensor per expert), the shards come with a `model.safetensors.index.json` as
transformers writes it, and every file is written under a temporary name and renamed. The tokenizer
files are the caller's (see trainer.export for TZD's SentencePiece model, tests for tokenizers built
in place).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from tzd.hf.families import STACKED, Family, part_sizes
from tzd.hf.loader import CONFIG_FILE, GENERATION_CONFIG, WEIGHTS_FILE, WEIGHTS_INDEX
from tzd.models import model_config


def family_tensors(model: nn.Module, family: Family, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under the family's tensor names (CPU, contiguous, in `dtype` or their own)."""
    cfg = model_config(model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, names in family.tensor_sources(cfg).items():
        t = state[key].detach().to("cpu", dtype or state[key].dtype)
        if key.endswith(STACKED):  # one tensor per expert
            pieces = list(t.unbind(0))
        else:
            pieces = t.split(part_sizes(key, cfg, len(names))) if len(names) > 1 else [t]
        out.update({n: p.contiguous().clone() for n, p in zip(names, pieces, strict=True)})
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def save_family(model: nn.Module, family: Family, out_dir: str | Path, special: dict[str, Any],
                dtype: torch.dtype | None = None, shard_bytes: int | None = None,
                generation: dict[str, Any] | None = None) -> Path:
    """config.json (+ `special`: mask_token_id, eos_token_id, ...), weights, generation_config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = family_tensors(model, family, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard_bytes is not None and shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        _save(shards[0], out / WEIGHTS_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save(shard, out / file)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(out / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _write_json(out / CONFIG_FILE, {**family.hf_config(model_config(model)), **special, "torch_dtype": dtype_name})
    if generation is not None:
        _write_json(out / GENERATION_CONFIG, generation)
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(path)
