"""SDAR-MoE (block diffusion on the Qwen3-MoE layout) in its Hugging Face layout: logits against
transformers' Qwen3-MoE under the block-causal mask, the exact cache, the layout's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.hf_checkpoints import write_sdar_moe
from tests.test_hf_families import hf_tensors
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.hf.families import FamilyConfigError
from tzd.hf.moe_families import sdar_moe_config
from tzd.models.blocks import block_ids
from tzd.sampling import SamplingParams, generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sdar_moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Loaded]:
    path = write_sdar_moe(tmp_path_factory.mktemp("sdar_moe") / "model")
    return path, load_checkpoint(path, device="cpu", dtype=torch.float32)


def qwen3_moe_reference(path: Path) -> torch.nn.Module:
    hf = json.loads((path / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
            "decoder_sparse_step", "mlp_only_layers")
    cfg = transformers.Qwen3MoeConfig(**{k: hf[k] for k in keys}, attn_implementation="eager")
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    model.load_state_dict(hf_tensors(path), strict=True)
    return model


def test_config(sdar_moe) -> None:
    path, L = sdar_moe
    cfg = L.model_config
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.first_k_dense_replace) == (8, 2, 1)
    assert cfg.router_score == "softmax" and not cfg.router_bias and cfg.n_shared_experts == 0
    assert cfg.attention == "block_causal" and cfg.diffusion_block == 4 and L.mask_id == 303
    hf = json.loads((path / "config.json").read_text())
    for key, value in (("decoder_sparse_step", 2), ("mlp_only_layers", [1])):
        with pytest.raises(FamilyConfigError, match=key):
            sdar_moe_config({**hf, key: value})


def test_logits_match_qwen3_moe_with_the_block_causal_mask(sdar_moe) -> None:
    path, L = sdar_moe
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 11), generator=g)
    ids[1, 6] = L.mask_id
    blocks = block_ids(11, 0, 4, align="absolute")
    allowed = blocks[:, None, :] <= blocks[:, :, None]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None].expand(2, 1, 11, 11)
    with torch.no_grad():
        want = qwen3_moe_reference(path)(ids, attention_mask=additive).logits
        got = L.model(ids)
    assert (got - want).abs().max().item() < 1e-5


def test_exact_cache(sdar_moe) -> None:
    _, L = sdar_moe
    prompts = [L.tokenizer.encode("To be, or not")[:n] for n in (5, 8, 3)]
    params = [SamplingParams(max_tokens=11, steps=11, seed=1), SamplingParams(max_tokens=8, steps=4, seed=2),
              SamplingParams(max_tokens=9, steps=9, threshold=0.5, seed=3)]
    uncached = generate(L.model, prompts, [q.model_copy(update={"cache": "none"}) for q in params], L.mask_id)
    cached = generate(L.model, prompts, [q.model_copy(update={"cache": "dual"}) for q in params], L.mask_id)
    assert [c.tokens for c in cached] == [u.tokens for u in uncached]
