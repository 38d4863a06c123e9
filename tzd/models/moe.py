"""The mixture-of-experts feed-forward of SMDM (LLaDA2, LLaDA-MoE, SDAR-MoE): a router, routed experts
stored stacked ([E, ...] tensors, one GEMM per expert: kernels.moe) and optional shared experts.

Routing follows the published MoE models: scores from fp32 router logits (softmax or sigmoid), an
optional per-expert bias that only chooses experts (DeepSeek-V3's auxiliary-loss-free balancing:
the weights come from the unbiased scores), optional group-limited choice, then the chosen weights
normalised (sum + 1e-20) and scaled by routed_scaling_factor.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels.moe
from tzd.models.config import ModelConfig
from tzd.models.invariant import ROW_TILE, tiled_linear


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.n_embd))
        if cfg.router_bias:  # in the checkpoint (a persistent buffer), updated by training's balancer only
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        self.batch_invariant = False  # set by tzd.models.invariant.set_batch_invariant

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N,C] -> (expert ids [N,k] long, weights [N,k] fp32)."""
        cfg = self.cfg
        logits = (tiled_linear if self.batch_invariant else F.linear)(x.float(), self.weight.float(), None)
        scores = logits.sigmoid() if cfg.router_score == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.expert_bias.float() if cfg.router_bias else scores
        if cfg.n_group > 1:
            choice = limit_to_groups(choice, cfg.n_group, cfg.topk_group)
        idx = choice.topk(cfg.n_experts_per_token, dim=-1).indices
        weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weights * cfg.routed_scaling_factor


def limit_to_groups(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """`choice` [N,E] with the experts outside each token's topk_group best groups set to -inf; a
    group's score is the sum of its two best expert scores."""
    N, E = choice.shape
    grouped = choice.view(N, n_group, E // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)


class Experts(nn.Module):
    """n_experts SwiGLU experts of width W, stacked: w1 (gate), w3 (up) [E,W,C]; w2 (down) [E,C,W]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, C, W = cfg.n_experts, cfg.n_embd, cfg.moe_intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, W, C))
        self.w3 = nn.Parameter(torch.empty(E, W, C))
        self.w2 = nn.Parameter(torch.empty(E, C, W))
        self.batch_invariant = False  # set by tzd.models.invariant.set_batch_invariant

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        row_tile = ROW_TILE if self.batch_invariant else None
        return kernels.moe.moe_swiglu(x, idx, weights, self.w1, self.w3, self.w2, row_tile=row_tile)


class MoEFeedForward(nn.Module):
    """Routed experts plus `shared` (the always-on experts as one dense SwiGLU, or None)."""

    def __init__(self, cfg: ModelConfig, shared: nn.Module | None) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = self.gate(flat)
        y = self.experts(flat, idx, weights).view(shape)
        return y + self.shared(x) if self.shared is not None else y
