"""Mixture-of-experts families in their Hugging Face layout, read as configurations of SMDM.

SDAR-MoE (`SDARMoeForCausalLM`): SDAR's block diffusion on the Qwen3-MoE layout (softmax routing over
fp32 logits, top-k, normalised where `norm_topk_prob`, no shared expert, `mlp_only_layers` dense).

LLaDA-MoE (`LLaDAMoEModelLM`, model_type `llada` as dense LLaDA's, hence dispatched on `architectures`;
LLaDA-MoE-7B-A1B): a bidirectional masked-diffusion model (LLaDA's sampler and caches) on an OLMoE body:
q/k/v/o projections, an RMSNorm over head_dim on q and k (`qk_layernorm`), dense layers where
`moe_layer_freq` is 0 (the first ones), softmax routing over fp32 logits to the top k, the weights
neither normalised nor scaled, an optional shared expert beside the routed ones.

LLaDA2.0 (`LLaDA2MoeModelLM`, model_type `llada2_moe`; mini 16B-A1.4B and flash 100B): a block-causal
diffusion model (blocks of 32 from position 0) with a Ling/Bailing body: fused q/k/v rows, RMSNorm over
head_dim on q and k before a partial RoPE, GQA, first_k_dense_replace dense layers then MoE layers with
sigmoid routing, an expert bias for selection, group-limited top-k, a shared expert.

The published modeling code routes one way whatever some config keys say (sigmoid scores in fp32, the
expert bias, the chosen weights normalised when top_k > 1): TZD builds what the code does and refuses a
config.json whose keys ask for something else, naming the key.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tzd.hf.families import (
    Family,
    FamilyConfigError,
    _get,
    _head_dim_matches,
    _require,
    dream_top,
    sdar_config,
    sdar_hf_config,
    sdar_layer,
)
from tzd.models import ModelConfig

LLADA2_BLOCK = 32  # the published generate()'s block_length (config.json names none)
LLADA2_IDS = {"mask": 156895, "eos": 156892}  # the published generate()'s defaults (not in config.json)


def llada2_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "rope_scaling", (None,), None)
    _require(hf, "use_bias", (False,), False)  # biases on the dense/expert projections: SMDM has none
    _require(hf, "use_qk_norm", (True,), True)  # the published attention always applies both norms
    _require(hf, "score_function", ("sigmoid",), "sigmoid")  # the code always routes with sigmoid ...
    _require(hf, "router_dtype", ("fp32",), "fp32")  # ... in fp32 ...
    _require(hf, "moe_router_enable_expert_bias", (True,), True)  # ... with the expert bias ...
    _require(hf, "norm_topk_prob", (True,), True)  # ... and normalised weights
    width, heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    head_dim = int(_get(hf, "head_dim", width // heads))
    factor = float(_get(hf, "partial_rotary_factor", 1.0))
    rope_dim = int(head_dim * factor)
    if rope_dim < 2 or rope_dim % 2:
        raise FamilyConfigError(f"partial_rotary_factor={factor}: rotates {rope_dim} of head_dim={head_dim} "
                                "dims; TZD needs an even number >= 2")
    n_layer = int(_get(hf, "num_hidden_layers"))
    moe: dict[str, Any] = {}
    experts = hf.get("num_experts")
    if experts:
        k = int(_get(hf, "num_experts_per_tok"))
        expert_width = int(_get(hf, "moe_intermediate_size"))
        shared = int(_get(hf, "num_shared_experts", 0))
        shared_width = hf.get("moe_shared_expert_intermediate_size")
        if shared_width is not None and int(shared_width) != shared * expert_width:
            raise FamilyConfigError(f"moe_shared_expert_intermediate_size={shared_width}: the published code "
                                    f"builds num_shared_experts * moe_intermediate_size ({shared * expert_width})")
        moe = dict(n_experts=int(experts), n_experts_per_token=k, moe_intermediate_size=expert_width,
                   n_shared_experts=shared, first_k_dense_replace=int(_get(hf, "first_k_dense_replace", 0)),
                   router_score="sigmoid", router_bias=True, n_group=int(_get(hf, "n_group")),
                   topk_group=int(_get(hf, "topk_group")), norm_topk_prob=k > 1,
                   routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0)))
    try:
        return ModelConfig(
            backend="smdm", vocab_size=int(_get(hf, "vocab_size")),
            context_len=int(_get(hf, "max_position_embeddings")), n_layer=n_layer, n_head=heads,
            n_kv_head=int(_get(hf, "num_key_value_heads", heads)), n_embd=width,
            intermediate_size=int(_get(hf, "intermediate_size")), rope_base=float(_get(hf, "rope_theta", 10000.0)),
            rotary_fraction=factor, norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
            qkv_bias=bool(_get(hf, "use_qkv_bias", False)), tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
            qk_norm=True, head_size=None if head_dim * heads == width else head_dim, attention="block_causal",
            diffusion_block=LLADA2_BLOCK, block_align="absolute", decode_rule="llada2", **moe)
    except ValueError as e:
        raise FamilyConfigError(_hf_key_message(str(e))) from None  # config.json's key, not ModelConfig's field


_HF_KEYS = {"model.n_experts_per_token": "num_experts_per_tok", "model.n_experts": "num_experts",
            "model.n_group": "n_group", "model.topk_group": "topk_group",
            "model.first_k_dense_replace": "first_k_dense_replace", "model.n_head": "num_attention_heads",
            "model.n_kv_head": "num_key_value_heads", "model.moe_intermediate_size": "moe_intermediate_size"}


def _hf_key_message(message: str) -> str:
    for ours, theirs in _HF_KEYS.items():
        message = message.replace(ours + "=", theirs + "=").replace(ours + " ", theirs + " ")
    return message


def llada2_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"], "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_len, "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.norm_eps,
        "partial_rotary_factor": cfg.rotary_fraction, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "rope_scaling": None, "use_qkv_bias": cfg.qkv_bias, "use_bias": False,
        "num_experts": cfg.n_experts or None}
    if cfg.n_experts:
        out.update({"num_experts_per_tok": cfg.n_experts_per_token, "moe_intermediate_size": cfg.moe_intermediate_size,
                    "num_shared_experts": cfg.n_shared_experts or None,
                    "first_k_dense_replace": cfg.first_k_dense_replace, "n_group": cfg.n_group,
                    "topk_group": cfg.topk_group, "routed_scaling_factor": cfg.routed_scaling_factor,
                    "score_function": "sigmoid", "router_dtype": "fp32", "moe_router_enable_expert_bias": True,
                    "norm_topk_prob": True})
    return out


def _swiglu_names(ours: str, theirs: str) -> dict[str, list[str]]:
    return {f"{ours}.w1.weight": [f"{theirs}.gate_proj.weight"], f"{ours}.w3.weight": [f"{theirs}.up_proj.weight"],
            f"{ours}.w2.weight": [f"{theirs}.down_proj.weight"]}


def llada2_layer(i: int, cfg: ModelConfig) -> dict[str, list[str]]:
    b = f"model.layers.{i}."
    a = b + "attention."
    names = {
        "attention_norm.weight": [b + "input_layernorm.weight"],
        "attention.wqkv.weight": [a + "query_key_value.weight"],  # fused already, rows q, k, v
        "attention.q_norm.weight": [a + "query_layernorm.weight"],
        "attention.k_norm.weight": [a + "key_layernorm.weight"],
        "attention.wo.weight": [a + "dense.weight"],
        "ffn_norm.weight": [b + "post_attention_layernorm.weight"],
    }
    if cfg.qkv_bias:
        names["attention.wqkv.bias"] = [a + "query_key_value.bias"]
    m = b + "mlp"
    if not cfg.is_moe_layer(i):
        names.update(_swiglu_names("feed_forward", m))
        return names
    names.update(_routed_names(m, cfg))
    names["feed_forward.gate.expert_bias"] = [m + ".gate.expert_bias"]
    if cfg.n_shared_experts:
        names.update(_swiglu_names("feed_forward.shared", m + ".shared_experts"))
    return names


def _routed_names(m: str, cfg: ModelConfig) -> dict[str, list[str]]:
    """The router and the experts of MoE block `m` (`model.layers.i.mlp`): one tensor per expert, stacked."""
    experts = range(cfg.n_experts)
    return {
        "feed_forward.gate.weight": [m + ".gate.weight"],
        "feed_forward.experts.w1": [f"{m}.experts.{e}.gate_proj.weight" for e in experts],
        "feed_forward.experts.w3": [f"{m}.experts.{e}.up_proj.weight" for e in experts],
        "feed_forward.experts.w2": [f"{m}.experts.{e}.down_proj.weight" for e in experts],
    }


def llada2_top(cfg: ModelConfig) -> dict[str, list[str]]:
    names = {"tok_embeddings.weight": ["model.word_embeddings.weight"], "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_embeddings:
        names["output.weight"] = ["lm_head.weight"]
    return names


def check_expert_count(names: set[str], cfg: ModelConfig) -> None:
    """A checkpoint holding an expert index >= num_experts in some layer disagrees with config.json (fewer
    experts show as a missing tensor, which the loader names)."""
    top: tuple[int, int, str] | None = None  # (expert, layer, a tensor of it): the highest expert found
    for name in names:
        parts = name.split(".")
        if len(parts) > 5 and parts[3:5] == ["mlp", "experts"] and parts[2].isdigit() and parts[5].isdigit():
            here = (int(parts[5]), int(parts[2]), name)
            top = here if top is None or here[:2] > top[:2] else top
    if top is not None and top[0] >= cfg.n_experts:
        raise FamilyConfigError(f"num_experts={cfg.n_experts}: the checkpoint holds {top[0] + 1} experts in layer "
                                f"{top[1]} ({top[2]})")


def llada2_family() -> Family:
    return Family("llada2_moe", "LLaDA2", llada2_config, llada2_layer, llada2_top, llada2_hf_config,
                  architectures=("LLaDA2MoeModelLM",), default_ids=LLADA2_IDS, check_names=check_expert_count)


# ---- SDAR-MoE (Qwen3-MoE layout, SDAR's blocks) ----------------------------------------------------------

def sdar_moe_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "decoder_sparse_step", (1,), 1)  # every layer past the dense ones routes
    dense = [int(i) for i in hf.get("mlp_only_layers") or []]
    if dense != list(range(len(dense))):
        raise FamilyConfigError(f"mlp_only_layers={dense}: TZD builds the dense layers first only (0..k-1)")
    cfg = sdar_config({**hf, "intermediate_size": hf.get("intermediate_size", hf.get("moe_intermediate_size"))})
    try:
        return replace(cfg, n_experts=int(_get(hf, "num_experts")),
                       n_experts_per_token=int(_get(hf, "num_experts_per_tok")),
                       moe_intermediate_size=int(_get(hf, "moe_intermediate_size")), first_k_dense_replace=len(dense),
                       router_score="softmax", norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)))
    except ValueError as e:
        raise FamilyConfigError(_hf_key_message(str(e))) from None


def sdar_moe_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {**sdar_hf_config(cfg), "model_type": "sdar_moe", "architectures": ["SDARMoeForCausalLM"],
            "num_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_experts_per_token,
            "moe_intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": list(range(cfg.first_k_dense_replace))}


def sdar_moe_layer(i: int, cfg: ModelConfig) -> dict[str, list[str]]:
    names = sdar_layer(i, cfg)
    if cfg.is_moe_layer(i):
        for k in ("w1", "w3", "w2"):
            del names[f"feed_forward.{k}.weight"]
        names.update(_routed_names(f"model.layers.{i}.mlp", cfg))
    return names


def sdar_moe_family() -> Family:
    return Family("sdar_moe", "SDAR-MoE", sdar_moe_config, sdar_moe_layer, dream_top, sdar_moe_hf_config,
                  architectures=("SDARMoeForCausalLM",), check_names=check_expert_count)


# ---- LLaDA-MoE (OLMoE layout, bidirectional) -------------------------------------------------------------

LLADA_MOE_IDS = {"mask": 156895}  # the mask id of LLaDA-MoE's tokenizer (LLaDA2's), where no file names it


def llada_moe_config(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "rope_scaling", (None,), None)
    _require(hf, "attention_bias", (False,), False)  # it would bias o_proj too, which SMDM has not
    _require(hf, "clip_qkv", (None,), None)
    # the published block routes one way whatever these say: softmax, top-k, weights as they are
    _require(hf, "moe_router_score_function", ("softmax", None), None)
    _require(hf, "norm_topk_prob", (False, None), None)
    _require(hf, "routed_scaling_factor", (1, 1.0, None), None)
    _require(hf, "router_num_group", (None, -2, 1), None)  # no group-limited routing in its code
    # its code adds the expert bias to the routing weights themselves (it weights as well as chooses);
    # TZD's router_bias only chooses
    _require(hf, "moe_router_enable_expert_bias", (False, None), None)
    width, heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    if width % heads:
        raise FamilyConfigError(f"num_attention_heads={heads}: must divide hidden_size={width}")
    _head_dim_matches(hf, width, heads)
    factor = float(_get(hf, "partial_rotary_factor", 1.0))
    if not 0.0 < factor <= 1.0:
        raise FamilyConfigError(f"partial_rotary_factor={factor}: must be in (0, 1]")
    n_layer = int(_get(hf, "num_hidden_layers"))
    freq = [int(f) for f in _get(hf, "moe_layer_freq")]
    dense = freq.index(1) if 1 in freq else len(freq)
    if len(freq) != n_layer or any(f != 0 for f in freq[:dense]) or any(f != 1 for f in freq[dense:]):
        raise FamilyConfigError(f"moe_layer_freq={freq}: TZD builds one entry per layer (num_hidden_layers="
                                f"{n_layer}), 0 (dense) for the first layers only, 1 (experts) for the rest")
    expert_width = int(_get(hf, "expert_intermediate_size"))
    shared_width = hf.get("shared_expert_intermediate_size")
    shared = 0
    if shared_width is not None and int(shared_width) > 0:
        if int(shared_width) % expert_width:
            raise FamilyConfigError(f"shared_expert_intermediate_size={shared_width}: TZD builds the shared expert "
                                    f"as a multiple of expert_intermediate_size ({expert_width})")
        shared = int(shared_width) // expert_width
    dense_width = hf.get("dense_intermediate_size")
    try:
        return ModelConfig(
            backend="smdm", vocab_size=int(_get(hf, "vocab_size")),
            context_len=int(_get(hf, "max_position_embeddings")), n_layer=n_layer, n_head=heads,
            n_kv_head=int(_get(hf, "num_key_value_heads", heads)), n_embd=width,
            intermediate_size=int(dense_width) if dense_width and int(dense_width) > 0 else expert_width,
            rope_base=float(_get(hf, "rope_theta", 10000.0)), rotary_fraction=factor,
            norm_eps=float(_get(hf, "rms_norm_eps", 1e-5)), tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
            qk_norm=bool(_get(hf, "qk_layernorm", False)), n_experts=int(_get(hf, "num_experts")),
            n_experts_per_token=int(_get(hf, "num_experts_per_tok")), moe_intermediate_size=expert_width,
            n_shared_experts=shared, first_k_dense_replace=dense, router_score="softmax", router_bias=False,
            norm_topk_prob=False, routed_scaling_factor=1.0)
    except ValueError as e:
        raise FamilyConfigError(_hf_key_message(str(e))) from None


def llada_moe_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "llada", "architectures": ["LLaDAMoEModelLM"], "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "dense_intermediate_size": cfg.intermediate_size, "expert_intermediate_size": cfg.moe_intermediate_size,
        "shared_expert_intermediate_size": (cfg.n_shared_experts * cfg.moe_intermediate_size
                                            if cfg.n_shared_experts else None),
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_len, "rope_theta": cfg.rope_base,
        "partial_rotary_factor": cfg.rotary_fraction, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "rope_scaling": None,
        "attention_bias": False, "clip_qkv": None, "qk_layernorm": cfg.qk_norm, "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.n_experts_per_token,
        "moe_layer_freq": [0 if i < cfg.first_k_dense_replace else 1 for i in range(cfg.n_layer)],
        "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False, "norm_topk_prob": False,
        "routed_scaling_factor": 1}


def llada_moe_layer(i: int, cfg: ModelConfig) -> dict[str, list[str]]:
    names = sdar_layer(i, cfg)  # the same q/k/v/o, q/k norm and SwiGLU names (Qwen3's and OLMoE's agree)
    if not cfg.qk_norm:
        del names["attention.q_norm.weight"], names["attention.k_norm.weight"]
    if cfg.is_moe_layer(i):
        for k in ("w1", "w3", "w2"):
            del names[f"feed_forward.{k}.weight"]
        names.update(_routed_names(f"model.layers.{i}.mlp", cfg))
        if cfg.n_shared_experts:  # beside the block, not inside it: model.layers.i.shared_expert
            names.update(_swiglu_names("feed_forward.shared", f"model.layers.{i}.shared_expert"))
    return names


def llada_moe_family() -> Family:
    return Family("llada_moe", "LLaDA-MoE", llada_moe_config, llada_moe_layer, dream_top, llada_moe_hf_config,
                  architectures=("LLaDAMoEModelLM",), default_ids=LLADA_MOE_IDS, check_names=check_expert_count)
