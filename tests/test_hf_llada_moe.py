"""LLaDA-MoE (`LLaDAMoEModelLM`, model_type `llada`: dispatched on `architectures`) in its Hugging Face
layout: logits against a reference forward written here from the published modeling semantics (OLMoE body,
q/k RMSNorm over head_dim, partial RoPE, softmax top-k routing with the weights as they are, a shared
expert beside the block, dense first layers by moe_layer_freq, bidirectional attention), greedy tokens
through the server's chat route, and one-line errors naming the key or tensor."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.hf_checkpoints import write_llada_moe
from tests.server_utils import ServerProcess
from tests.test_hf_llada2 import _mlp, _rms  # the published forward's RMSNorm and SwiGLU (the same in both)
from tzd.checkpoint import CheckpointError, Loaded, load_checkpoint
from tzd.hf.families import family_of
from tzd.models.invariant import set_batch_invariant
from tzd.sampling import SamplingParams, generate

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def llada_moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Loaded]:
    path = write_llada_moe(tmp_path_factory.mktemp("lladamoe") / "model")
    return path, load_checkpoint(path, device="cpu", dtype=torch.float32)


def llada_moe_reference(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """The published LLaDAMoEModelLM forward on the checkpoint's own tensors, ids [B, T] -> logits."""
    hf = json.loads((path / "config.json").read_text())
    t = load_file(str(path / "model.safetensors"))
    B, T = ids.shape
    C, H, Hk, eps = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["rms_norm_eps"]
    D = C // H
    rot = int(D * hf["partial_rotary_factor"])  # HF's default RoPE over the first `rot` dims, rotate_half
    inv_freq = 1.0 / (hf["rope_theta"] ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()

    def rope(x: torch.Tensor) -> torch.Tensor:
        r, rest = x[..., :rot], x[..., rot:]
        half = torch.cat((-r[..., rot // 2:], r[..., :rot // 2]), -1)
        return torch.cat((r * cos + half * sin, rest), -1)

    x = t["model.embed_tokens.weight"][ids]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        a = p + "self_attn."
        q, k, v = (F.linear(h, t[a + f"{n}_proj.weight"]) for n in "qkv")
        q = _rms(q.reshape(-1, D), t[a + "q_norm.weight"], eps).view(B, T, H, D).transpose(1, 2)
        k = _rms(k.reshape(-1, D), t[a + "k_norm.weight"], eps).view(B, T, Hk, D).transpose(1, 2)
        v = v.view(B, T, Hk, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(D), dim=-1, dtype=torch.float32)  # no mask
        x = x + F.linear((att @ v).transpose(1, 2).reshape(B, T, C), t[a + "o_proj.weight"])
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        if hf["moe_layer_freq"][i] == 0:
            x = x + _mlp(t, m, h)
            continue
        flat = h.reshape(-1, C)
        weights = F.softmax(F.linear(flat, t[m + "gate.weight"]), dim=1, dtype=torch.float)
        w, idx = torch.topk(weights, hf["num_experts_per_tok"], dim=-1)  # not normalised
        y = torch.zeros_like(flat)
        for e in range(hf["num_experts"]):  # the reference's own loop: every expert over its tokens
            token, choice = (idx == e).nonzero(as_tuple=True)
            if len(token):
                y.index_add_(0, token, w[token, choice, None] * _mlp(t, f"{m}experts.{e}.", flat[token]))
        x = x + y.view_as(h) + _mlp(t, p + "shared_expert.", h)
    return F.linear(_rms(x, t["model.norm.weight"], eps), t["lm_head.weight"])


def test_config_dispatch_and_ids(llada_moe) -> None:
    path, L = llada_moe
    hf = json.loads((path / "config.json").read_text())
    assert hf["model_type"] == "llada" and family_of(hf).name == "LLaDA-MoE"
    assert family_of({**hf, "architectures": ["LLaDAModelLM"]}).name == "LLaDA"  # the dense family
    cfg = L.model_config
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.n_shared_experts, cfg.first_k_dense_replace) == (8, 2, 1, 1)
    assert cfg.router_score == "softmax" and not cfg.router_bias and not cfg.norm_topk_prob
    assert cfg.attention == "bidirectional" and cfg.qk_norm and cfg.rotary_dim == 4
    assert L.mask_id == 303 and L.tokenizer.eos_ids == (300,)


def test_logits_match_the_published_forward(llada_moe) -> None:
    path, L = llada_moe
    ids = torch.tensor([[5, 17, 42, 303, 303, 99, 7, 303], [1, 2, 3, 4, 5, 6, 303, 303]])
    with torch.no_grad():
        got = L.model(ids)
    want = llada_moe_reference(path, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_batch_invariant_greedy_tokens(llada_moe) -> None:
    _, L = llada_moe
    prompts = [[5, 17, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9], [60, 61]]
    params = [SamplingParams(max_tokens=12, steps=12, block_length=4, seed=i, cache=c)
              for i, c in enumerate(("none", "dual", "prefix"))]
    set_batch_invariant(L.model, True)
    try:
        together = generate(L.model, prompts, params, L.mask_id)
        alone = [generate(L.model, [p], [sp], L.mask_id)[0] for p, sp in zip(prompts, params, strict=True)]
    finally:
        set_batch_invariant(L.model, False)
    assert [r.tokens for r in together] == [r.tokens for r in alone]


def test_greedy_tokens_through_the_chat_route(llada_moe, tmp_path: Path) -> None:
    path, L = llada_moe
    messages = [{"role": "user", "content": "To be, or not?"}]
    chat_ids = L.tokenizer.encode_chat(L.tokenizer.chat.render(messages))
    [want] = generate(L.model, [chat_ids], SamplingParams(max_tokens=16, steps=16), L.mask_id,
                      eos_id=L.tokenizer.eos_ids, tokenizer=L.tokenizer)
    with ServerProcess(path, "--dtype", "float32", "--max-batch-size", "2", log_dir=tmp_path) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                       json={"messages": messages, "max_tokens": 16, "steps": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want.text
        card = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"][0]
        assert (card["experts"], card["attention"]) == (8, "bidirectional")


@pytest.mark.parametrize(("key", "value", "named"), [
    ("moe_router_enable_expert_bias", True, "moe_router_enable_expert_bias"),
    ("norm_topk_prob", True, "norm_topk_prob"),
    ("moe_layer_freq", [1, 0, 1], "moe_layer_freq"),
    ("clip_qkv", 8.0, "clip_qkv"),
    ("shared_expert_intermediate_size", 24, "shared_expert_intermediate_size"),
])
def test_unsupported_config_names_the_key(llada_moe, tmp_path: Path, key: str, value: object, named: str) -> None:
    path, _ = llada_moe
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    hf = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**hf, key: value}))
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(bad, device="cpu")


def test_a_missing_expert_tensor_is_named(llada_moe, tmp_path: Path) -> None:
    path, _ = llada_moe
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    t = load_file(str(bad / "model.safetensors"))
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_checkpoint(bad, device="cpu")
