"""LLaDA2.0 (`LLaDA2MoeModelLM`, mixture of experts, block diffusion) in its Hugging Face layout: logits
against a reference forward written here from the published modeling semantics, the special ids and
block length from the files or the published defaults, the exact block cache, one-line errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.hf_checkpoints import write_llada2
from tzd.checkpoint import CheckpointError, Loaded, load_checkpoint
from tzd.hf.families import FamilyConfigError, family_of
from tzd.hf.moe_families import llada2_config
from tzd.models import ForwardContext
from tzd.models.blocks import block_ids
from tzd.sampling import SamplingParams, generate

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def llada2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Loaded]:
    path = write_llada2(tmp_path_factory.mktemp("llada2") / "model")
    return path, load_checkpoint(path, device="cpu", dtype=torch.float32)


# ---- the reference: the published LLaDA2MoeModelLM forward, on the checkpoint's own tensors ----------

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """HF's default RoPE on the first rope_dim dims (rotate_half), the rest passed through; x [B,H,T,D]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    freqs = pos[:, None].float() * inv_freq[None]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    half = torch.cat((-rot[..., rope_dim // 2:], rot[..., :rope_dim // 2]), -1)
    return torch.cat((rot * cos + half * sin, rest), -1)


def _gate(t: dict, p: str, x: torch.Tensor, hf: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA2MoeGate: sigmoid scores, the bias chooses (groups of the top-2 sums, then top-k), weights from
    the unbiased scores normalised (sum + 1e-20) and scaled."""
    scores = torch.sigmoid(F.linear(x.float(), t[p + "gate.weight"].float()))
    biased = scores + t[p + "gate.expert_bias"]
    N, G = x.shape[0], hf["n_group"]
    group_scores = biased.view(N, G, -1).topk(2, dim=-1)[0].sum(-1)
    groups = torch.topk(group_scores, k=hf["topk_group"], dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, groups, 1)
    keep = group_mask[..., None].expand(N, G, hf["num_experts"] // G).reshape(N, -1)
    idx = torch.topk(biased.masked_fill(~keep.bool(), float("-inf")), k=hf["num_experts_per_tok"], dim=-1)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * hf["routed_scaling_factor"]


def _mlp(t: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, t[p + "gate_proj.weight"])) * F.linear(x, t[p + "up_proj.weight"]),
                    t[p + "down_proj.weight"])


def llada2_reference(path: Path, ids: torch.Tensor, block: int = 32) -> torch.Tensor:
    hf = json.loads((path / "config.json").read_text())
    t = load_file(str(path / "model.safetensors"))
    B, T = ids.shape
    H, Hk, D, eps = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["rms_norm_eps"]
    rope_dim = int(D * hf["partial_rotary_factor"])
    pos = torch.arange(T)
    blocks = pos // block
    additive = torch.zeros(T, T).masked_fill(blocks[None, :] > blocks[:, None], float("-inf"))
    x = t["model.word_embeddings.weight"][ids]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        qkv = F.linear(h, t[p + "attention.query_key_value.weight"]).view(B, T, H + 2 * Hk, D)
        q, k, v = (z.transpose(1, 2) for z in qkv.split([H, Hk, Hk], dim=-2))
        q = _rope(_rms(q, t[p + "attention.query_layernorm.weight"], eps), pos, rope_dim, hf["rope_theta"])
        k = _rope(_rms(k, t[p + "attention.key_layernorm.weight"], eps), pos, rope_dim, hf["rope_theta"])
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(D) + additive, dim=-1, dtype=torch.float32)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(B, T, H * D), t[p + "attention.dense.weight"])
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        if i < hf["first_k_dense_replace"]:
            x = x + _mlp(t, m, h)
            continue
        flat = h.reshape(-1, h.shape[-1])
        idx, w = _gate(t, m, flat, hf)
        y = torch.zeros_like(flat)
        for e in range(hf["num_experts"]):  # the reference's own loop: every expert over its tokens
            token, choice = (idx == e).nonzero(as_tuple=True)
            if len(token):
                y[token] += w[token, choice, None] * _mlp(t, f"{m}experts.{e}.", flat[token])
        x = x + y.view_as(h) + _mlp(t, m + "shared_experts.", h)
    return F.linear(_rms(x, t["model.norm.weight"], eps), t["lm_head.weight"])


# ---- tests -------------------------------------------------------------------------------------------

def test_config_special_ids_and_dispatch(llada2) -> None:
    path, L = llada2
    cfg = L.model_config
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.n_group, cfg.topk_group) == (8, 3, 4, 2)
    assert cfg.router_score == "sigmoid" and cfg.router_bias and cfg.routed_scaling_factor == 2.5
    assert cfg.attention == "block_causal" and cfg.diffusion_block == 32 and cfg.block_align == "absolute"
    assert cfg.qk_norm and cfg.rotary_dim == 8 and cfg.head_dim == 16 and cfg.n_kv_head == 2
    assert L.mask_id == 156895 and L.tokenizer.eos_ids == (156892,)
    hf = json.loads((path / "config.json").read_text())
    assert family_of({**hf, "model_type": "llada2_moe_v2"}).name == "LLaDA2"  # architectures first


def test_published_defaults_when_the_tokenizer_names_no_mask(llada2, tmp_path: Path) -> None:
    path, _ = llada2
    d = tmp_path / "m"
    shutil.copytree(path, d)
    tok = json.loads((d / "tokenizer_config.json").read_text())
    del tok["mask_token"], tok["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    L = load_checkpoint(d, device="cpu")
    assert L.mask_id == 156895 and L.tokenizer.eos_ids == (156892,)


def test_logits_match_the_published_forward(llada2) -> None:
    path, L = llada2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 37), generator=g)  # two blocks of 32, the second partial
    ids[0, 5] = ids[1, 33] = L.mask_id
    with torch.no_grad():
        want = llada2_reference(path, ids)
        got = L.model(ids)  # a block-causal model's default layout: blocks of 32 from position 0
        tzd_layout = L.model(ids, ForwardContext(block_ids=block_ids(37, 7, 32)))
    assert (got - want).abs().max().item() < 1e-5
    assert (tzd_layout - want).abs().max().item() > 1e-4  # the prompt-aligned layout is another model


def test_exact_block_cache_equals_the_uncached_sampler(llada2) -> None:
    _, L = llada2
    prompts = [L.tokenizer.encode("To be, or not")[:n] for n in (5, 30, 11)]
    params = [SamplingParams(max_tokens=40, steps=20, seed=1), SamplingParams(max_tokens=12, steps=12, seed=2),
              SamplingParams(max_tokens=25, steps=25, threshold=0.5, seed=3)]
    assert_cache_exact(L, prompts, params)


def assert_cache_exact(L: Loaded, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """The dual and prefix caches give a block-causal model the uncached sampler's tokens, batched."""
    uncached = generate(L.model, prompts, [q.model_copy(update={"cache": "none"}) for q in params], L.mask_id)
    for cache in ("dual", "prefix"):
        cached = generate(L.model, prompts, [q.model_copy(update={"cache": cache}) for q in params], L.mask_id)
        assert [c.tokens for c in cached] == [u.tokens for u in uncached], cache


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _err(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, device="cpu")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_checkpoints_name_the_key_or_tensor(llada2, tmp_path: Path) -> None:
    path, _ = llada2
    d = _copy(path, tmp_path / "missing")
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    assert "model.layers.2.mlp.experts.5.up_proj.weight is missing" in _err(d)

    hf = json.loads((path / "config.json").read_text())
    d = _copy(path, tmp_path / "count")
    (d / "config.json").write_text(json.dumps({**hf, "num_experts": 4, "n_group": 2, "topk_group": 2}))
    assert "num_experts=4: the checkpoint holds 8 experts in layer 2 (model.layers.2.mlp.experts.7." in _err(d)
    (d / "config.json").write_text(json.dumps({**hf, "num_experts": 16, "n_group": 4}))
    assert "experts.8.gate_proj.weight is missing" in _err(d)

    for key, value in (("score_function", "softmax"), ("norm_topk_prob", False), ("router_dtype", "bf16"),
                       ("moe_router_enable_expert_bias", False), ("use_qk_norm", False),
                       ("moe_shared_expert_intermediate_size", 7), ("partial_rotary_factor", 0.2)):
        with pytest.raises(FamilyConfigError, match=key):
            llada2_config({**hf, key: value})
    with pytest.raises(FamilyConfigError, match="num_experts_per_tok=9"):
        llada2_config({**hf, "num_experts_per_tok": 9})
    with pytest.raises(FamilyConfigError, match="n_group: missing"):
        llada2_config({k: v for k, v in hf.items() if k != "n_group"})
