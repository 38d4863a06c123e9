"""SMDM: our own bidirectional transformer (RMSNorm, RoPE, SwiGLU, optional GQA), also the network of the
public LLaMA-like diffusion families (LLaDA, Dream: see tzd.hf for the mapping) through config switches."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from tzd.models.config import ModelConfig
from tzd.models.context import ForwardContext
from tzd.models.moe import Experts, MoEFeedForward, Router


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.wqkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        if cfg.qk_norm:  # per head, before RoPE (Qwen3 layout: SDAR)
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.batch_invariant = False  # set by tzd.models.invariant.set_batch_invariant

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q, k, v = self.wqkv(x).split([H * D, Hk * D, Hk * D], dim=-1)
        q, k = q.view(B, T, H, D), k.view(B, T, Hk, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = kernels.rope(q, k, cos, sin, ctx.positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, Hk, D).transpose(1, 2)
        seqlens = ctx.seqlens
        if ctx.cache is not None:
            k, v, seqlens = ctx.cache.attend(self.layer, k, v)
        y = ctx.attention(q, k, v, seqlens, causal=self.cfg.causal, invariant=self.batch_invariant)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class FeedForward(nn.Module):
    """SwiGLU of `width` (default cfg.intermediate_size)."""

    def __init__(self, cfg: ModelConfig, width: int | None = None) -> None:
        super().__init__()
        width = width or cfg.intermediate_size
        self.w1 = nn.Linear(cfg.n_embd, width, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, width, bias=False)
        self.w2 = nn.Linear(width, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def feed_forward(cfg: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s feed-forward: dense SwiGLU, or routed experts (+ shared ones) in an MoE layer."""
    if not cfg.is_moe_layer(layer):
        return FeedForward(cfg)
    shared = FeedForward(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None
    return MoEFeedForward(cfg, shared)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = feed_forward(cfg, layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class SMDM(nn.Module):
    """model(ids [B,T]) -> logits [B,T,V]; every position sees every other unless config.causal (left to right)
    or config.attention is "block_causal" (its own block and the blocks before it)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = self.tzd_config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of the residual projections
            if name.endswith(("wo.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * cfg.n_layer) ** 0.5)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables: at init, and on the real device after a model built on `meta` is loaded."""
        cfg = self.config
        self.rope_cos, self.rope_sin = kernels.rope_cache(cfg.context_len, cfg.rotary_dim, cfg.rope_base, device)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, Router)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, Experts):
            for w in (module.w1, module.w3, module.w2):
                nn.init.normal_(w, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        cfg = self.config
        ctx = ctx or ForwardContext()
        ctx.check_length(ids.shape[1], cfg.context_len)
        ctx = ctx.resolve(ids.shape[1], cfg.diffusion_block if cfg.block_causal else None)
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin, ctx)
        return self.output(self.norm(ctx.select_outputs(x, shift=self.config.logit_shift)))
