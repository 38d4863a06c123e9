"""The families TZD reads in their Hugging Face layout, each as (config.json -> ModelConfig, tensor names).

A family maps every tensor of SMDM's state dict to the checkpoint tensors it is made of: one name,
or several concatenated along the first dim (SMDM fuses q, k and v into one projection `wqkv`).
The key names follow the families' published configuration and modeling files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tzd.models import ModelConfig


class FamilyConfigError(ValueError):
    """config.json asks for something SMDM does not build; the message names the key."""


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's `model_type`
    name: str
    model_config: Callable[[dict[str, Any]], ModelConfig]
    layer_names: Callable[[int, ModelConfig], dict[str, list[str]]]  # SMDM's names in layer i -> sources
    top_names: Callable[[ModelConfig], dict[str, list[str]]]  # embeddings, final norm, head

    hf_config: Callable[[ModelConfig], dict[str, Any]]  # the inverse of model_config (export, test checkpoints)
    # config.json's `architectures` that name this family, matched before any `model_type` (LLaDA2's
    # model_type has variants; LLaDA-MoE shares LLaDA's); the dense families go by model_type alone
    architectures: tuple[str, ...] = ()
    # special ids the family's published generate() assumes when neither config.json, generation_config.json
    # nor the tokenizer's special tokens name them ({"mask": id, "eos": id})
    default_ids: dict[str, int] | None = None
    # (checkpoint tensor names, ModelConfig) -> None or FamilyConfigError: a layout check the names alone
    # cannot do per tensor (an expert count that disagrees with config.json)
    check_names: Callable[[set[str], ModelConfig], None] | None = None

    def tensor_sources(self, cfg: ModelConfig) -> dict[str, list[str]]:
        """Every SMDM state-dict key (tied head left out) -> the checkpoint tensors concatenated into it."""
        names = dict(self.top_names(cfg))
        for i in range(cfg.n_layer):
            names.update({f"layers.{i}.{k}": v for k, v in self.layer_names(i, cfg).items()})
        return names


def _get(hf: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise FamilyConfigError(f"{key}: missing")
    return default


def _require(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise FamilyConfigError(f"{key}={value!r}: not supported (TZD builds {' or '.join(map(repr, allowed))})")


def _head_dim_matches(hf: dict[str, Any], width: int, heads: int) -> None:
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != width:
        raise FamilyConfigError(f"head_dim={head_dim}: TZD needs head_dim * heads == the model width ({width})")


# ---- LLaDA (OLMo-style config, `model.transformer.*` tensors) ----------------------------------------

def llada_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "block_type", ("llama",), "llama")
    _require(hf, "layer_norm_type", ("rms",), "rms")
    _require(hf, "activation_type", ("silu",), "silu")
    for key in ("alibi", "include_bias", "attention_layer_norm", "scale_logits", "input_emb_norm"):
        _require(hf, key, (False, None), False)
    _require(hf, "rope", (True,), True)
    d_model, heads = int(_get(hf, "d_model")), int(_get(hf, "n_heads"))
    _head_dim_matches(hf, d_model, heads)
    return ModelConfig(
        backend="smdm", vocab_size=int(_get(hf, "embedding_size", _get(hf, "vocab_size"))),
        context_len=int(_get(hf, "max_sequence_length")), n_layer=int(_get(hf, "n_layers")), n_head=heads,
        n_kv_head=int(_get(hf, "n_kv_heads", heads)), n_embd=d_model,
        intermediate_size=int(_get(hf, "mlp_hidden_size", int(_get(hf, "mlp_ratio", 4)) * d_model)),
        rope_base=float(_get(hf, "rope_theta", 10000.0)), norm_eps=float(_get(hf, "rms_norm_eps", 1e-5)),
        qkv_bias=bool(_get(hf, "include_qkv_bias", False)), tie_embeddings=bool(_get(hf, "weight_tying", False)))


def llada_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "block_type": "llama",
            "d_model": cfg.n_embd, "n_layers": cfg.n_layer, "n_heads": cfg.n_head, "n_kv_heads": cfg.n_kv_head,
            "mlp_hidden_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size,
            "max_sequence_length": cfg.context_len, "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.norm_eps,
            "weight_tying": cfg.tie_embeddings, "include_bias": False, "include_qkv_bias": cfg.qkv_bias,
            "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "alibi": False}


def llada_layer(i: int, cfg: ModelConfig) -> dict[str, list[str]]:
    b = f"model.transformer.blocks.{i}."
    names = {
        "attention_norm.weight": [b + "attn_norm.weight"],
        "attention.wqkv.weight": [b + "q_proj.weight", b + "k_proj.weight", b + "v_proj.weight"],
        "attention.wo.weight": [b + "attn_out.weight"],
        "ffn_norm.weight": [b + "ff_norm.weight"],
        "feed_forward.w1.weight": [b + "ff_proj.weight"],  # the SiLU-gated projection
        "feed_forward.w3.weight": [b + "up_proj.weight"],
        "feed_forward.w2.weight": [b + "ff_out.weight"],
    }
    if cfg.qkv_bias:
        names["attention.wqkv.bias"] = [b + "q_proj.bias", b + "k_proj.bias", b + "v_proj.bias"]
    return names


def llada_top(cfg: ModelConfig) -> dict[str, list[str]]:
    names = {"tok_embeddings.weight": ["model.transformer.wte.weight"],
             "norm.weight": ["model.transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        names["output.weight"] = ["model.transformer.ff_out.weight"]
    return names


# ---- Dream (Qwen2 layout, logits shifted one position right) --------------------------------------

def dream_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "rope_scaling", (None,), None)
    width, heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    _head_dim_matches(hf, width, heads)
    return ModelConfig(
        backend="smdm", vocab_size=int(_get(hf, "vocab_size")), context_len=int(_get(hf, "max_position_embeddings")),
        n_layer=int(_get(hf, "num_hidden_layers")), n_head=heads,
        n_kv_head=int(_get(hf, "num_key_value_heads", heads)), n_embd=width,
        intermediate_size=int(_get(hf, "intermediate_size")), rope_base=float(_get(hf, "rope_theta", 10000.0)),
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), qkv_bias=True,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)), logit_shift=True)


def dream_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": cfg.n_embd,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_len, "rope_theta": cfg.rope_base,
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
            "rope_scaling": None}


def dream_layer(i: int, cfg: ModelConfig) -> dict[str, list[str]]:
    b = f"model.layers.{i}."
    a = b + "self_attn."
    return {
        "attention_norm.weight": [b + "input_layernorm.weight"],
        "attention.wqkv.weight": [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
        "attention.wqkv.bias": [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"],
        "attention.wo.weight": [a + "o_proj.weight"],
        "ffn_norm.weight": [b + "post_attention_layernorm.weight"],
        "feed_forward.w1.weight": [b + "mlp.gate_proj.weight"],
        "feed_forward.w3.weight": [b + "mlp.up_proj.weight"],
        "feed_forward.w2.weight": [b + "mlp.down_proj.weight"],
    }


def dream_top(cfg: ModelConfig) -> dict[str, list[str]]:
    names = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_embeddings:
        names["output.weight"] = ["lm_head.weight"]
    return names


# ---- SDAR (Qwen3 layout, block-causal: blocks at multiples of its block length from position 0) -------

SDAR_DEFAULT_BLOCK = 4  # the block length of SDAR's own generate script when config.json names none


def sdar_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "rope_scaling", (None,), None)
    _require(hf, "attention_bias", (False,), False)  # Qwen3's flag also biases o_proj, which SMDM has not
    _require(hf, "use_sliding_window", (False,), False)
    width, heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    head_dim = int(_get(hf, "head_dim", width // heads))
    block = hf.get("block_length", hf.get("block_size", SDAR_DEFAULT_BLOCK))
    return ModelConfig(
        backend="smdm", vocab_size=int(_get(hf, "vocab_size")), context_len=int(_get(hf, "max_position_embeddings")),
        n_layer=int(_get(hf, "num_hidden_layers")), n_head=heads,
        n_kv_head=int(_get(hf, "num_key_value_heads", heads)), n_embd=width,
        intermediate_size=int(_get(hf, "intermediate_size")), rope_base=float(_get(hf, "rope_theta", 10000.0)),
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        qk_norm=True, head_size=None if head_dim * heads == width else head_dim, attention="block_causal",
        diffusion_block=int(block), block_align="absolute")


def sdar_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"model_type": "sdar", "architectures": ["SDARForCausalLM"], "hidden_size": cfg.n_embd,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_len, "rope_theta": cfg.rope_base,
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
            "rope_scaling": None, "attention_bias": False, "block_length": cfg.diffusion_block}


def sdar_layer(i: int, cfg: ModelConfig) -> dict[str, list[str]]:
    names = dream_layer(i, cfg)
    del names["attention.wqkv.bias"]
    a = f"model.layers.{i}.self_attn."
    names.update({"attention.q_norm.weight": [a + "q_norm.weight"], "attention.k_norm.weight": [a + "k_norm.weight"]})
    return names


def _families() -> dict[str, Family]:
    from tzd.hf.moe_families import (  # noqa: PLC0415 - builds on the helpers above
        llada2_family,
        llada_moe_family,
        sdar_moe_family,
    )

    llada2, sdar_moe, llada_moe = llada2_family(), sdar_moe_family(), llada_moe_family()
    return {
        "llada": Family("llada", "LLaDA", llada_config, llada_layer, llada_top, llada_hf_config),
        "Dream": Family("Dream", "Dream", dream_config, dream_layer, dream_top, dream_hf_config),
        "sdar": Family("sdar", "SDAR", sdar_config, sdar_layer, dream_top, sdar_hf_config),
        llada2.model_type: llada2,
        sdar_moe.model_type: sdar_moe,
        llada_moe.model_type: llada_moe,  # found by architectures (its model_type is llada's)
    }


FAMILIES: dict[str, Family] = _families()

STACKED = ("experts.w1", "experts.w2", "experts.w3")  # SMDM keys stacked from one tensor per expert


def part_sizes(key: str, cfg: ModelConfig, parts: int) -> list[int]:
    """First-dim sizes of the checkpoint tensors fused into SMDM's `key` (q, k, v for wqkv)."""
    if parts == 1:
        return []
    if key.endswith(("wqkv.weight", "wqkv.bias")):
        D = cfg.head_dim
        return [cfg.n_head * D, cfg.n_kv_head * D, cfg.n_kv_head * D]
    raise ValueError(f"{key}: no known split into {parts} tensors")


def family_of(hf: dict[str, Any] | str) -> Family:
    """The family of a config.json: the first of its `architectures` a family names, else its
    `model_type` (a bare string is a model_type); FamilyConfigError listing the known ones."""
    if isinstance(hf, dict):
        for arch in hf.get("architectures") or ():
            for family in FAMILIES.values():
                if arch in family.architectures:
                    return family
        model_type = hf.get("model_type")
    else:
        model_type = hf
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise FamilyConfigError(f"model_type={model_type!r}: not a family TZD reads "
                                f"(known: {', '.join(sorted(FAMILIES))})")
    return family
