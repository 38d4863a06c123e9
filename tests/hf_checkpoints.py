"""Tiny LLaDA, Dream, SDAR, SDAR-MoE, LLaDA2 and LLaDA-MoE checkpoints written in their exact Hugging Face
layout (no hub here).

Weights: a random SMDM of the family's configuration, written by tzd.hf.export under the family's
tensor names. Tokenizer: a byte-level BPE trained on a few lines, with the family's special tokens
placed at the ids its config names. Chat templates in the families' styles (Llama-3 headers for
LLaDA, ChatML for Dream).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tzd.hf import FAMILIES
from tzd.hf.export import save_family
from tzd.models import ModelConfig, build_model

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles. Hello world! 12345\n")

LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
DREAM_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# LLaDA-8B's real special ids and vocabulary size; Dream's placed after a tiny vocabulary
LLADA_SPECIALS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|start_header_id|>": 126346,
                  "<|end_header_id|>": 126347, "<|eot_id|>": 126348, "<|mdm_mask|>": 126336}
LLADA_VOCAB = 126464


def write_tokenizer(out: Path, specials: dict[str, int], base_vocab: int, bos: str | None) -> None:
    """A byte-level BPE of `base_vocab` ids with `specials` at their ids (gaps are allowed)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator([TEXT] * 4, trainer)
    if bos is not None:  # LLaDA's tokenizer puts its BOS before every encoded text
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, specials[bos])])
    spec = json.loads(tk.to_str())
    for text, i in specials.items():
        spec["model"]["vocab"][text] = i
        spec["added_tokens"].append({"id": i, "content": text, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
    (out / "tokenizer.json").write_text(json.dumps(spec))


def tiny_config(family: str, vocab: int, **over: object) -> ModelConfig:
    base = dict(backend="smdm", vocab_size=vocab, context_len=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                intermediate_size=64, norm_eps=1e-5)
    if family == "llada":
        base.update(rope_base=500000.0, n_kv_head=4)
    elif family == "sdar":  # Qwen3 layout: q/k norms, a head size that is not width / heads, blocks of 4
        base.update(rope_base=1e6, norm_eps=1e-6, qk_norm=True, head_size=16, attention="block_causal",
                    diffusion_block=4, block_align="absolute")
    elif family == "Dream":
        base.update(rope_base=1e6, norm_eps=1e-6, qkv_bias=True, logit_shift=True)
    base.update(over)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # visible norms and biases: a wrong mapping of either changes the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.2)
    return model


def write_llada(out: Path, shard_bytes: int | None = None, **over: object) -> Path:
    """LLaDA layout with LLaDA-8B's special ids and vocabulary size at a small width."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config("llada", LLADA_VOCAB, **over)
    special = {"mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081, "bos_token_id": 126080}
    save_family(random_model(cfg, 0), FAMILIES["llada"], out, special, shard_bytes=shard_bytes,
                generation={"bos_token_id": 126080, "eos_token_id": 126081})
    write_tokenizer(out, LLADA_SPECIALS, 300, bos="<|startoftext|>")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|eot_id|>", "pad_token": "<|endoftext|>",
        "chat_template": LLADA_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def write_sdar(out: Path, family: str = "sdar", seed: int = 2, **over: object) -> Path:
    """SDAR layout (Qwen3 tensors with q/k norms, GQA, block-causal with blocks of 4, ChatML); `family`
    sdar_moe writes SDAR-MoE's (Qwen3-MoE) layout of the same."""
    out.mkdir(parents=True, exist_ok=True)
    specials = {"<|endoftext|>": 300, "<|im_start|>": 301, "<|im_end|>": 302, "<|MASK|>": 303}
    cfg = tiny_config("sdar", 320, **over)
    special = {"eos_token_id": 302, "pad_token_id": 300, "bos_token_id": 300}  # the mask id: tokenizer_config
    save_family(random_model(cfg, seed), FAMILIES[family], out, special, generation={"eos_token_id": 302})
    write_tokenizer(out, specials, 300, bos=None)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "mask_token": "<|MASK|>",
        "chat_template": DREAM_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def write_dream(out: Path, shard_bytes: int | None = 60_000, **over: object) -> Path:
    """Dream layout (Qwen2 tensors, q/k/v biases, GQA, shifted logits), sharded with an index by default."""
    out.mkdir(parents=True, exist_ok=True)
    specials = {"<|endoftext|>": 300, "<|im_start|>": 301, "<|im_end|>": 302, "<|mask|>": 303}
    cfg = tiny_config("Dream", 320, **over)
    special = {"mask_token_id": 303, "eos_token_id": 300, "pad_token_id": 300, "bos_token_id": 300}
    save_family(random_model(cfg, 1), FAMILIES["Dream"], out, special, shard_bytes=shard_bytes,
                generation={"eos_token_id": 300, "mask_token_id": 303})
    write_tokenizer(out, specials, 300, bos=None)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
        "chat_template": DREAM_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


# LLaDA2.0's real special ids and vocabulary size (the mask and eos as its published generate() defaults)
LLADA2_SPECIALS = {"<|endoftext|>": 156892, "<role>": 156900, "</role>": 156901, "<|mask|>": 156895}
LLADA2_VOCAB = 157184
LLADA2_TEMPLATE = (
    "{%- for message in messages %}{{- '<role>' + message['role'] | upper + '</role>' + message['content'] }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<role>ASSISTANT</role>' }}{%- endif %}")


def llada2_model_config(**over: object) -> ModelConfig:
    """LLaDA2-mini's structure at a tiny width: a dense first layer, then 8 experts (top 3 of 4 groups, 2
    chosen), a shared expert, sigmoid routing with the expert bias, partial RoPE, q/k norms, GQA, a head size
    that is not width / heads, blocks of 32."""
    base = dict(n_layer=3, n_head=4, n_kv_head=2, head_size=16, rope_base=600000.0, rotary_fraction=0.5,
                norm_eps=1e-6, qk_norm=True, attention="block_causal", diffusion_block=32, block_align="absolute",
                intermediate_size=48, n_experts=8, n_experts_per_token=3, moe_intermediate_size=16,
                n_shared_experts=1, first_k_dense_replace=1, router_score="sigmoid", router_bias=True, n_group=4,
                topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    base.update(over)
    return tiny_config("llada2", LLADA2_VOCAB, **base)


def write_llada2(out: Path, shard_bytes: int | None = None, **over: object) -> Path:
    """LLaDA2.0 layout (`LLaDA2MoeModelLM`): config.json without the mask and eos ids (pad 156892 only), as
    published; the tokenizer's special tokens name them."""
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(llada2_model_config(**over), 3)
    with torch.no_grad():  # a visible expert bias: selection must use it and weighting must not
        for block in model.layers:
            gate = getattr(block.feed_forward, "gate", None)
            if gate is not None:
                gate.expert_bias.normal_(0, 0.3)
    save_family(model, FAMILIES["llada2_moe"], out, {"pad_token_id": 156892}, shard_bytes=shard_bytes,
                generation={})
    write_tokenizer(out, LLADA2_SPECIALS, 300, bos=None)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
        "chat_template": LLADA2_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def write_sdar_moe(out: Path, **over: object) -> Path:
    """SDAR-MoE layout (`SDARMoeForCausalLM`: Qwen3-MoE tensors, a dense first layer via mlp_only_layers, 8
    experts top 2 with softmax routing, blocks of 4 from position 0, ChatML)."""
    moe = dict(n_layer=3, n_experts=8, n_experts_per_token=2, moe_intermediate_size=16, first_k_dense_replace=1,
               router_score="softmax", norm_topk_prob=True)
    return write_sdar(out, "sdar_moe", 4, **{**moe, **over})


def write_llada_moe(out: Path, **over: object) -> Path:
    """LLaDA-MoE layout (`LLaDAMoEModelLM`, model_type llada: OLMoE tensors, q/k norms over head_dim, a dense
    first layer by moe_layer_freq, 8 experts top 2 with softmax routing and unnormalised weights, a shared
    expert beside them, partial RoPE, bidirectional); the mask id from the tokenizer's special tokens."""
    out.mkdir(parents=True, exist_ok=True)
    specials = {"<|endoftext|>": 300, "<role>": 301, "</role>": 302, "<|mask|>": 303}
    base = dict(n_layer=3, n_head=4, n_kv_head=2, rope_base=50000.0, rotary_fraction=0.5, qk_norm=True,
                n_experts=8, n_experts_per_token=2, moe_intermediate_size=16, n_shared_experts=1,
                first_k_dense_replace=1, router_score="softmax", norm_topk_prob=False)
    cfg = tiny_config("llada_moe", 320, **{**base, **over})
    special = {"eos_token_id": 300, "pad_token_id": 300}
    save_family(random_model(cfg, 5), FAMILIES["llada_moe"], out, special, generation={"eos_token_id": 300})
    write_tokenizer(out, specials, 300, bos=None)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
        "chat_template": LLADA2_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out
