"""The mixture-of-experts feed-forward against a naive per-token reference written here from the
published routing (fp32, 1e-5): sigmoid and softmax scores, the selection-only expert bias, group-limited
top-k, normalised and scaled weights, shared experts; odd token counts, experts no token chose, both
compute paths (torch._grouped_mm and the per-expert loop) and the batch-invariant tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.moe
from tzd.models import ModelConfig, build_model, count_params
from tzd.models.invariant import set_batch_invariant
from tzd.models.moe import MoEFeedForward
from tzd.models.smdm import FeedForward, feed_forward


def moe_config(**over: object) -> ModelConfig:
    base = dict(vocab_size=64, context_len=64, n_layer=3, n_head=4, n_embd=32, intermediate_size=48,
                n_experts=8, n_experts_per_token=3, moe_intermediate_size=16, n_shared_experts=1,
                first_k_dense_replace=1, router_score="sigmoid", router_bias=True, n_group=4, topk_group=2,
                norm_topk_prob=True, routed_scaling_factor=2.5)
    base.update(over)
    return ModelConfig(**base)


def random_layer(cfg: ModelConfig, seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = feed_forward(cfg, cfg.first_k_dense_replace)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        if cfg.router_bias:
            layer.gate.expert_bias.normal_(0, 0.3)
    return layer.eval()


def naive_moe(layer: MoEFeedForward, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, one chosen expert at a time, as the published modeling files write it."""
    E, G = cfg.n_experts, cfg.n_group
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = layer.gate.weight.float() @ x[n].float()
        scores = torch.sigmoid(logits) if cfg.router_score == "sigmoid" else torch.softmax(logits, -1)
        biased = scores + layer.gate.expert_bias if cfg.router_bias else scores.clone()
        if G > 1:
            per_group = biased.view(G, E // G)
            group_score = torch.stack([g.sort(descending=True).values[:2].sum() for g in per_group])
            best = set(group_score.argsort(descending=True)[:cfg.topk_group].tolist())
            for g in range(G):
                if g not in best:
                    biased[g * (E // G):(g + 1) * (E // G)] = float("-inf")
        chosen = biased.argsort(descending=True)[:cfg.n_experts_per_token]
        w = scores[chosen]
        if cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        w = w * cfg.routed_scaling_factor
        for weight, e in zip(w, chosen.tolist(), strict=True):
            ex = layer.experts
            h = F.silu(ex.w1[e] @ x[n]) * (ex.w3[e] @ x[n])
            out[n] += weight * (ex.w2[e] @ h)
        if layer.shared is not None:
            s = layer.shared
            out[n] += s.w2.weight @ (F.silu(s.w1.weight @ x[n]) * (s.w3.weight @ x[n]))
    return out


CASES = {
    "sigmoid-bias-groups": {},
    "softmax-no-groups-no-shared": dict(router_score="softmax", router_bias=False, n_group=1, topk_group=1,
                                        n_shared_experts=0, routed_scaling_factor=1.0),
    "softmax-unnormalised-top1": dict(router_score="softmax", router_bias=False, n_group=1, topk_group=1,
                                      n_experts_per_token=1, norm_topk_prob=False),
    "two-shared-experts": dict(n_shared_experts=2, n_group=2, topk_group=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tokens", [1, 7, 13])
def test_moe_matches_the_per_token_reference(case: str, tokens: int) -> None:
    cfg = moe_config(**CASES[case])
    layer = random_layer(cfg, seed=tokens)
    x = torch.randn(tokens, cfg.n_embd)
    with torch.no_grad():
        want = naive_moe(layer, cfg, x)
        got = layer(x[None])[0]  # [1, N, C] as the model calls it
    assert got.shape == x.shape
    assert (got - want).abs().max().item() < 1e-5


def test_unused_experts_and_both_compute_paths() -> None:
    cfg = moe_config(router_bias=True)
    layer = random_layer(cfg, seed=3)
    with torch.no_grad():
        layer.gate.expert_bias.copy_(torch.tensor([5.0, 5.0, 5.0, -9, -9, -9, -9, -9]))  # only 0..2 chosen
        x = torch.randn(5, 3, cfg.n_embd)
        idx, weights = layer.gate(x.reshape(-1, cfg.n_embd))
        assert set(idx.flatten().tolist()) == {0, 1, 2}  # experts 3..7 get no rows
        assert torch.allclose(weights.sum(-1), torch.full((15,), 2.5))  # normalised, then scaled
        want = naive_moe(layer, cfg, x.reshape(-1, cfg.n_embd)).view_as(x)
        got = layer(x)
        assert (got - want).abs().max().item() < 1e-5
        ex = layer.experts
        flat = x.reshape(-1, cfg.n_embd)
        grouped = kernels.moe.moe_swiglu(flat, idx, weights, ex.w1, ex.w3, ex.w2)
        tiles = kernels.moe.moe_swiglu(flat, idx, weights, ex.w1, ex.w3, ex.w2, row_tile=4)  # 5 rows: 2 tiles
        torch.set_grad_enabled(True)
        loop = kernels.moe.moe_swiglu(flat, idx, weights, ex.w1, ex.w3, ex.w2.requires_grad_())  # grad: the loop
    assert (loop - grouped).abs().max().item() < 1e-5 and (tiles - loop).abs().max().item() < 1e-5


def test_batch_invariant_rows() -> None:
    """In --deterministic mode a token's output does not depend on how many tokens share its experts."""
    cfg = moe_config()
    layer = set_batch_invariant(random_layer(cfg, seed=4))
    x = torch.randn(1, 9, cfg.n_embd)
    with torch.no_grad():
        alone = layer(x[:, :1])
        beside = layer(x)[:, :1]
    assert torch.equal(alone, beside)


def test_gradients_flow_through_the_loop_path() -> None:
    cfg = moe_config()
    layer = random_layer(cfg).train()
    x = torch.randn(2, 5, cfg.n_embd, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.experts.w1.grad is not None and x.grad is not None
    assert layer.gate.weight.grad is not None  # through the weights of the chosen experts


def test_model_layers_and_parameter_counts() -> None:
    cfg = moe_config()
    model = build_model(cfg)
    assert isinstance(model.layers[0].feed_forward, FeedForward)  # first_k_dense_replace dense layers first
    assert all(isinstance(b.feed_forward, MoEFeedForward) for b in model.layers[1:])
    assert "layers.1.feed_forward.gate.expert_bias" in model.state_dict()  # persistent: in checkpoints
    assert model.layers[1].feed_forward.experts.w1.shape == (8, 16, 32)  # stacked [E, W, C]
    unused = 2 * (8 - 3) * 3 * 32 * 16  # two MoE layers, 5 experts a token skips, 3 matrices of 32x16
    assert cfg.unrouted_params() == unused and count_params(model) > unused
    logits = model(torch.randint(0, 64, (2, 11)))
    assert logits.shape == (2, 11, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("bad, field", [
    (dict(n_experts_per_token=9), "n_experts_per_token"), (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"), (dict(n_group=8, topk_group=2), "n_group"),
    (dict(router_score="relu"), "router_score"), (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(n_group=4, topk_group=1, n_experts_per_token=3), "topk_group"),
])
def test_bad_moe_config_names_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"model.{field}"):
        moe_config(**bad)
