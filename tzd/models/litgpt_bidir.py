"""litgpt's GPT made bidirectional (or block-causal) without a fork.

Every block's attention is swapped for `BidirectionalSelfAttention`, which has the same parameters
(so litgpt weights and names are kept) but routes through `kernels.rope` / `kernels.attention` and
never applies a causal mask, the softcapping path included. litgpt's `mask` argument carries our
`ForwardContext` down to the attention.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from litgpt.config import Config
from litgpt.model import GPT, CausalSelfAttention, do_softcapping

import kernels
from tzd.models.config import ModelConfig
from tzd.models.context import ForwardContext


def litgpt_config(cfg: ModelConfig) -> Config:
    """A LLaMA-style litgpt Config with our architecture (RMSNorm, SwiGLU, no bias, RoPE)."""
    return Config(
        name="tzd",
        block_size=cfg.context_len,  # litgpt's name for the context length
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.vocab_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_query_groups=cfg.n_kv_head,
        n_embd=cfg.n_embd,
        rotary_percentage=cfg.rotary_dim / cfg.head_dim,
        rope_base=int(cfg.rope_base),
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=cfg.norm_eps,
        mlp_class_name="LLaMAMLP",
        intermediate_size=cfg.intermediate_size,
    )


class BidirectionalSelfAttention(CausalSelfAttention):
    """litgpt attention with no causal mask; `mask` is our ForwardContext."""

    def __init__(self, config: Config, block_idx: int, causal: bool) -> None:
        super().__init__(config, block_idx)
        self.causal = causal
        self.batch_invariant = False  # set by tzd.models.invariant.set_batch_invariant

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: ForwardContext | None = None, input_pos: torch.Tensor | None = None,
                input_pos_maxp1: int | None = None) -> torch.Tensor:
        if input_pos is not None:
            raise ValueError("litgpt's autoregressive KV cache does not apply to a bidirectional model")
        ctx = mask or ForwardContext()
        cfg = self.config
        B, T, _ = x.shape
        H, Hk, D = cfg.n_head, cfg.n_query_groups, cfg.head_size
        q, k, v = self.qkv(x).split((H * D, Hk * D, Hk * D), dim=-1)
        q, k = kernels.rope(q.view(B, T, H, D), k.view(B, T, Hk, D), cos, sin, ctx.positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, Hk, D).transpose(1, 2)
        seqlens = ctx.seqlens
        if ctx.cache is not None:
            k, v, seqlens = ctx.cache.attend(self.block_idx, k, v)
        scale = 1.0 / math.sqrt(cfg.attention_scores_scalar or D)
        if cfg.attention_logit_softcapping is not None:
            y = self._softcapped(q, k, v, seqlens, scale, ctx)
        else:
            y = ctx.attention(q, k, v, seqlens, scale=scale, causal=self.causal, invariant=self.batch_invariant)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    def _softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    seqlens: torch.Tensor | None, scale: float, ctx: ForwardContext) -> torch.Tensor:
        """Explicit attention for softcapped configs (SDPA cannot softcap); still bidirectional."""
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = do_softcapping(q @ k.mT * scale, self.config.attention_logit_softcapping)
        S = k.shape[2]
        if seqlens is not None:
            keep = torch.arange(S, device=q.device)[None, :] < seqlens[:, None]
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        if self.causal:
            tri = torch.ones(q.shape[2], S, dtype=torch.bool, device=q.device).tril(S - q.shape[2])
            scores = scores.masked_fill(~tri, float("-inf"))
        allowed = kernels.reference.block_mask(**ctx.mask_args(S))
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class BidirectionalGPT(GPT):
    """litgpt.GPT whose blocks attend in both directions; model(ids) -> logits [B,T,V]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(litgpt_config(cfg))
        self.tzd_config = cfg
        for i, block in enumerate(self.transformer.h):
            attn = BidirectionalSelfAttention(self.config, i, causal=cfg.causal)
            attn.load_state_dict(block.attn.state_dict())
            block.attn = attn
        cos, sin = kernels.rope_cache(cfg.context_len, cfg.rotary_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def forward(self, ids: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:  # type: ignore[override]
        cfg = self.tzd_config
        ctx = ctx or ForwardContext()
        ctx.check_length(ids.shape[1], cfg.context_len)
        ctx = ctx.resolve(ids.shape[1], cfg.diffusion_block if cfg.block_causal else None)
        x = self.transformer.wte(ids)
        if self.config.scale_embeddings:
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        for block in self.transformer.h:
            x = block(x, self.rope_cos, self.rope_sin, ctx)
        x = self.transformer.ln_f(ctx.select_outputs(x))
        clamp = (partial(do_softcapping, thresh=self.config.final_logit_softcapping)
                 if self.config.final_logit_softcapping is not None else (lambda t: t))
        return clamp(self.lm_head(x))
