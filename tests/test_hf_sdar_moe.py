"""SDAR-MoE (block diffusion on the Qwen3-MoE layout) in its Hugging Face layout: logits against
transformers' Qwen3-MoE under the block-causal mask, the exact cache, the layout's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.hf_checkpoints import write_sdar_moe
from tests.test_hf_llada2 import assert_cache_exact
from tests.test_hf_sdar import absolute_block_mask, qwen3_reference
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.hf.families import FamilyConfigError
from tzd.hf.moe_families import sdar_moe_config
from tzd.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sdar_moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Loaded]:
    path = write_sdar_moe(tmp_path_factory.mktemp("sdar_moe") / "model")
    return path, load_checkpoint(path, device="cpu", dtype=torch.float32)


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
    with torch.no_grad():
        want = qwen3_reference(path, moe=True)(ids, attention_mask=absolute_block_mask(2, 11, 4)).logits
        got = L.model(ids)
    assert (got - want).abs().max().item() < 1e-5


def test_exact_cache(sdar_moe) -> None:
    _, L = sdar_moe
    prompts = [L.tokenizer.encode("To be, or not")[:n] for n in (5, 8, 3)]
    params = [SamplingParams(max_tokens=11, steps=11, seed=1), SamplingParams(max_tokens=8, steps=4, seed=2),
              SamplingParams(max_tokens=9, steps=9, threshold=0.5, seed=3)]
    assert_cache_exact(L, prompts, params)
