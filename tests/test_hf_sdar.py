"""SDAR (block diffusion, Qwen3 layout) in its Hugging Face layout: logits against transformers' Qwen3
under the block-causal mask, SDAR's absolute block alignment in the sampler, the exact cache on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.hf_checkpoints import write_sdar
from tests.test_hf_families import hf_tensors
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.hf.families import FamilyConfigError, sdar_config
from tzd.models import ForwardContext
from tzd.models.blocks import block_ids
from tzd.sampling import SamplingParams, generate, plan

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sdar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Loaded]:
    path = write_sdar(tmp_path_factory.mktemp("sdar") / "model")
    return path, load_checkpoint(path, device="cpu", dtype=torch.float32)


QWEN3_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "tie_word_embeddings")
QWEN3_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers")


def qwen3_reference(path: Path, moe: bool = False) -> torch.nn.Module:
    """transformers' Qwen3 (or Qwen3-MoE) with the directory's tensors, same names."""
    hf = json.loads((path / "config.json").read_text())
    keys = QWEN3_KEYS + (QWEN3_MOE_KEYS if moe else ())
    config_cls, model_cls = ((transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM) if moe
                             else (transformers.Qwen3Config, transformers.Qwen3ForCausalLM))
    model = model_cls(config_cls(**{k: hf[k] for k in keys}, attn_implementation="eager")).eval()
    model.load_state_dict(hf_tensors(path), strict=True)
    return model


def absolute_block_mask(B: int, T: int, block: int) -> torch.Tensor:
    """[B,1,T,T] additive mask of SDAR's layout: own block and earlier ones, blocks from position 0."""
    blocks = block_ids(T, 0, block, align="absolute")
    allowed = blocks[:, None, :] <= blocks[:, :, None]  # [1, T, T]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None].expand(B, 1, T, T)


def test_config_and_special_ids(sdar) -> None:
    path, L = sdar
    cfg = L.model_config
    assert cfg.attention == "block_causal" and cfg.block_align == "absolute" and cfg.diffusion_block == 4
    assert cfg.qk_norm and cfg.head_dim == 16 and cfg.n_embd == 32  # head size != width / heads
    assert L.mask_id == 303 and L.tokenizer.eos_ids == (302,)
    hf = json.loads((path / "config.json").read_text())
    with pytest.raises(FamilyConfigError, match="attention_bias"):
        sdar_config({**hf, "attention_bias": True})
    assert sdar_config({k: v for k, v in hf.items() if k != "block_length"}).diffusion_block == 4


def test_logits_match_qwen3_with_the_block_causal_mask(sdar) -> None:
    path, L = sdar
    ids = torch.tensor([L.tokenizer.encode("To be, or not to be, that is the question")[:11],
                        L.tokenizer.encode("Hello world! the slings and arrows of")[:11]])
    ids[1, 6] = L.mask_id
    additive = absolute_block_mask(2, 11, 4)
    with torch.no_grad():
        want = qwen3_reference(path)(ids, attention_mask=additive).logits
        got = L.model(ids)  # a block-causal model's default layout: blocks of 4 from position 0
    assert (got - want).abs().max().item() < 1e-5
    prompt_aligned = L.model(ids, ForwardContext(block_ids=block_ids(11, 5, 4)))  # TZD's layout differs
    assert (prompt_aligned - want).abs().max().item() > 1e-4


def test_absolute_blocks_in_the_sampler(sdar) -> None:
    _, L = sdar
    p = plan(SamplingParams(max_tokens=10), 5, 128, model_block=4, absolute_blocks=True)
    assert p.first_block == 3 and p.num_blocks == 3  # [5,8) (the rest of the prompt's last block), [8,12), [12,15)
    prompts = [L.tokenizer.encode("To be, or not")[:n] for n in (5, 8, 3)]
    params = [SamplingParams(max_tokens=11, steps=11, seed=1), SamplingParams(max_tokens=8, steps=4, seed=2),
              SamplingParams(max_tokens=9, steps=9, threshold=0.5, seed=3)]
    uncached = generate(L.model, prompts, params, L.mask_id)
    for cache in ("dual", "prefix"):
        cached = generate(L.model, prompts, [q.model_copy(update={"cache": cache}) for q in params], L.mask_id)
        assert [c.tokens for c in cached] == [u.tokens for u in uncached]
