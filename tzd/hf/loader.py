"""Load a Hugging Face checkpoint directory (LLaDA, Dream, SDAR, LLaDA2) into SMDM, straight to the
target device and dtype.

The model is built on the meta device (no random init, no fp32 copy) and every tensor is read
from its safetensors file once, converted, and assigned; a shard is closed as soon as no tensor
still to load lives in it, so peak memory is about the model plus one tensor in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from tzd.hf.families import STACKED, Family, FamilyConfigError, family_of
from tzd.hf.tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, HFTokenizer, read_json
from tzd.models import ModelConfig, build_model, linear_modules
from tzd.quant import QuantConfig, Quantizer
from tzd.tokenizer import SpecialIds

CONFIG_FILE, GENERATION_CONFIG = "config.json", "generation_config.json"
WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
COPY_KEPT_BELOW = 64 << 20  # bytes: kept tensors copied out of a shard while quantizing (read_tensors)


class HFCheckpointError(ValueError):
    """A directory in a family's layout that cannot be loaded; the message names the file and key."""


def is_hf_checkpoint(path: str | Path) -> bool:
    """config.json names a `model_type` (TZD's own config.json has a `format_version` instead)."""
    try:
        config = read_json(Path(path) / CONFIG_FILE)
    except ValueError:
        return False
    return "model_type" in config and "format_version" not in config


def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it: from the shard index, or the one model.safetensors."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = read_json(index).get("weight_map")
        except ValueError as e:
            raise HFCheckpointError(str(e)) from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index}: no 'weight_map' object")
        files: dict[str, Path] = {}
        for name, file in weight_map.items():
            shard = path / str(file)
            if not shard.is_file():
                raise HFCheckpointError(f"{index}: names {file} for tensor {name}, but {shard} is missing")
            files[name] = shard
        return files
    single = path / WEIGHTS_FILE
    if not single.is_file():
        raise HFCheckpointError(f"{path}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} (shards) is here")
    try:
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"{single}: unreadable or truncated safetensors ({e})") from None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def special_ids(path: Path, config: dict[str, Any], generation: dict[str, Any], tok_config: dict[str, Any],
                token_id: Callable[[str], int | None], defaults: dict[str, int] | None = None
                ) -> tuple[SpecialIds, tuple[int, ...]]:
    """(mask, bos, eos, pad ids; the eos set) from config.json, generation_config.json and tokenizer_config.json;
    `defaults` (a family's published generate() defaults: mask, eos) where none of them names one."""
    defaults = defaults or {}
    from tzd.hf.chat import token_text

    def first(key: str) -> int | None:
        for source in (config, generation):
            ids = _ids(source.get(f"{key}_token_id"))
            if ids:
                return ids[0]
        text = token_text(tok_config.get(f"{key}_token"))
        found = token_id(text) if text is not None else None
        return found if found is not None else defaults.get(key)

    mask = first("mask")
    if mask is None:
        raise HFCheckpointError(f"{path / CONFIG_FILE}: no mask_token_id (nor in {GENERATION_CONFIG} or a "
                                f"mask_token in {TOKENIZER_CONFIG}): a diffusion model needs its mask id")
    eos = _ids(config.get("eos_token_id")) + _ids(generation.get("eos_token_id"))
    eos_text = token_text(tok_config.get("eos_token"))
    if eos_text is not None and token_id(eos_text) is not None:
        eos.append(int(token_id(eos_text)))  # an instruct model's end of turn
    if not eos and "eos" in defaults:
        eos.append(defaults["eos"])
    eos_set = tuple(dict.fromkeys(e for e in eos if e != mask))
    return SpecialIds(mask=mask, bos=first("bos"), eos=eos_set[0] if eos_set else None, pad=first("pad"),
                      unk=first("unk")), eos_set


def _linear_names(model: nn.Module) -> set[str]:
    return {f"{m}.{p}" for m, mod in linear_modules(model) for p, _ in mod.named_parameters(recurse=False)}


def read_tensors(path: Path, family: Family, cfg: ModelConfig, expected: dict[str, torch.Size],
                 device: torch.device, dtype_of: Callable[[str], torch.dtype],
                 take: Callable[[str, torch.Tensor], bool] | None = None) -> dict[str, torch.Tensor]:
    """SMDM's state dict, each tensor read once (parts concatenated or stacked), converted and on `device`.

    `take(key, tensor)`: offered every tensor as soon as it is read; one it returns True for (a quantized
    layer's, which it has quantized) is dropped instead of kept in the state dict."""
    files = weight_files(path)
    if family.check_names is not None:
        try:
            family.check_names(set(files), cfg)
        except FamilyConfigError as e:
            raise HFCheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    sources = family.tensor_sources(cfg)
    for parts in sources.values():
        for name in parts:
            if name not in files:
                where = WEIGHTS_INDEX if (path / WEIGHTS_INDEX).is_file() else WEIGHTS_FILE
                raise HFCheckpointError(f"{path / where}: tensor {name} is missing (config.json's "
                                        f"{family.name} layout needs it)")
    last_use = {files[n]: i for i, parts in enumerate(sources.values()) for n in parts}
    handles: dict[Path, Any] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        for i, (key, parts) in enumerate(sources.items()):
            want = expected[key]
            stacked = key.endswith(STACKED)  # [E, ...] from one tensor per expert, else parts along dim 0
            single = len(parts) == 1 and not stacked  # read as it is; else filled slot by slot
            merged = None if single else torch.empty(want, device=device, dtype=dtype_of(key))
            offset = 0
            for j, name in enumerate(parts):
                file = files[name]
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="pt")
                t = handles[file].get_tensor(name)
                if (t.shape if stacked else t.shape[1:]) != want[1:]:
                    implied = ", ".join(map(str, want[1:])) if stacked else f"..., {', '.join(map(str, want[1:]))}"
                    raise HFCheckpointError(f"{file}: tensor {name} has shape {tuple(t.shape)}, config.json implies "
                                            f"({implied})")
                if merged is None:
                    merged = t.to(device=device, dtype=dtype_of(key))
                elif stacked:
                    merged[j].copy_(t)  # into its slot: peak memory is the model plus one part in flight
                else:
                    if offset + t.shape[0] <= want[0]:
                        merged[offset:offset + t.shape[0]].copy_(t)
                    offset += t.shape[0]
                del t
            rows = merged.shape[0] if single else (want[0] if stacked else offset)
            if (rows, *merged.shape[1:]) != tuple(want):
                shapes = ", ".join(f"{n} {tuple(handles[files[n]].get_slice(n).get_shape())}" for n in parts)
                made = tuple(merged.shape) if single else (rows, *want[1:])
                raise HFCheckpointError(f"{files[parts[0]]}: {shapes} make {made}; config.json implies "
                                        f"{tuple(want)}")
            if take is None:
                state[key] = merged
            elif not take(key, merged):
                # a kept tensor read straight from the file is a view of its shard's mapping and keeps every
                # page read from the shard resident (a norm's view: the quantized layers' float pages). Small
                # ones are copied so the shard goes once its quantized tensors are done; a large one (a float
                # head or embedding) stays a view, whose pages are its own and are read only where used.
                small = merged.device.type == "cpu" and merged.nbytes < COPY_KEPT_BELOW
                state[key] = merged.clone() if small else merged
            del merged
            for file in [f for f in handles if last_use[f] <= i]:  # unmap shards no later tensor needs
                handles.pop(file).__exit__(None, None, None)
    except (SafetensorError, OSError) as e:
        raise HFCheckpointError(f"{path}: unreadable or truncated safetensors ({e})") from None
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return state


def load_hf_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype | None = None,
                       linear_dtype: torch.dtype | None = None, max_context: int | None = None,
                       quantization: QuantConfig | None = None
                       ) -> tuple[nn.Module, HFTokenizer, dict[str, Any], ModelConfig, SpecialIds]:
    """(model, tokenizer, config.json, ModelConfig, special ids) of a family directory.

    `dtype` (default fp32) for every tensor; `linear_dtype` for the nn.Linear weights where given (CPU
    serving keeps them in bf16 under autocast); `max_context` caps the served context (and RoPE tables);
    `quantization`: the linear layers (and head) quantized as each tensor is read (tzd.quant)."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    try:
        hf = read_json(cfg_path)
        family = family_of(hf)
        model_cfg = family.model_config(hf)
    except (FamilyConfigError, ValueError) as e:
        raise HFCheckpointError(f"{cfg_path}: {e}") from None
    if max_context is not None:
        model_cfg.context_len = min(model_cfg.context_len, max_context)
    try:
        generation = read_json(path / GENERATION_CONFIG)
        tok_config = read_json(path / TOKENIZER_CONFIG)
    except ValueError as e:
        raise HFCheckpointError(str(e)) from None
    tok_file = path / TOKENIZER_JSON
    if not tok_file.is_file():
        raise HFCheckpointError(f"{tok_file}: missing (TZD reads the Hugging Face `tokenizers` format)")
    try:
        tokenizer = HFTokenizer(tok_file, SpecialIds(), (), tok_config)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
        raise HFCheckpointError(f"{tok_file}: {e}") from None
    special, eos = special_ids(path, hf, generation, tok_config, tokenizer.token_id, family.default_ids)
    if not tokenizer.piece(special.mask):
        raise HFCheckpointError(f"{tok_file}: no token with the mask id {special.mask} (config.json's "
                                f"mask_token_id)")
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise HFCheckpointError(f"{tok_file}: {tokenizer.vocab_size} tokens exceed the model's vocab_size "
                                f"{model_cfg.vocab_size} (config.json)")
    tokenizer.set_special(special, eos)

    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = build_model(model_cfg)
    linear = _linear_names(model)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    quantizer = Quantizer(model, quantization, linear_dtype or dtype, dtype) if quantization else None
    state = read_tensors(path, family, model_cfg, expected, device,
                         lambda k: linear_dtype if linear_dtype is not None and k in linear else dtype,
                         quantizer.take if quantizer else None)
    if quantizer is not None:
        quantizer.finish()
    tied = model_cfg.tie_embeddings and "tok_embeddings.weight" in state  # not when both were quantized
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.init_rope(device)
    model.eval().requires_grad_(False)
    return model, tokenizer, hf, model_cfg, special
