"""What one forward pass needs besides token ids: positions, key lengths and an optional KV cache."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

import kernels


class KVCache(Protocol):
    """A block KV cache (see tzd.sampling.cache): merges a layer's fresh keys/values with cached ones."""

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Given fresh k, v [B,Hk,T,D] of `layer`, return the keys/values to attend to and their lengths."""
        ...


@dataclass
class ForwardContext:
    positions: torch.Tensor | None = None  # [B,T] absolute positions; None = 0..T-1
    seqlens: torch.Tensor | None = None  # [B] valid keys per row (padding beyond); None = all
    cache: KVCache | None = None
    # [B,P] positions whose logits are wanted (the sampler needs only the current block); None = all
    output_positions: torch.Tensor | None = None
    # block-causal models: [B,L] block id of every absolute position (tzd.models.blocks), L >= the keys;
    # a query at position p sees the keys whose block id is <= p's. None = bidirectional
    block_ids: torch.Tensor | None = None
    # an explicit [B,1,T,S] bool mask (True = attend), for layouts block ids cannot say (training's two streams)
    attn_mask: torch.Tensor | None = None
    query_blocks: torch.Tensor | None = None  # [B,T]: block_ids at the queries' positions (set by `resolve`)
    # packed rows (varlen): ids are [1, N], the rows' tokens one after another; row b is
    # cu_seqlens[b]:cu_seqlens[b+1] ([B+1] int32) and attends within itself; positions are within-row
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    def check_length(self, T: int, context: int) -> None:
        """Raise when a forward of T columns reaches past the model's `context` (its RoPE table). With
        explicit positions the positions count, not the columns: training's two-stream input has 2T
        columns at positions 0..T-1. On an accelerator positions are not read back (that would cost the
        sampler's step a device sync): there the RoPE table lookup's own bounds check stands."""
        if self.positions is None:
            if T > context:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {context}")
        elif self.positions.device.type == "cpu" and self.positions.numel() and int(self.positions.max()) >= context:
            raise ValueError(f"position {int(self.positions.max())} exceeds the context of {context} "
                             f"(positions 0..{context - 1})")

    def resolve(self, T: int, default_block: int | None) -> ForwardContext:
        """This context with the queries' block ids looked up once per forward (not per layer). A
        block-causal model (`default_block` = its block size) given neither block ids nor a mask gets the
        training layout: blocks of `default_block` from position 0."""
        ctx = self
        if ctx.query_blocks is not None:  # given (packed rows carry their tokens' block ids)
            return ctx
        if default_block is not None and ctx.block_ids is None and ctx.attn_mask is None:
            from tzd.models.blocks import block_ids  # noqa: PLC0415 - tiny module, avoids a cycle
            device = ctx.positions.device if ctx.positions is not None else None
            L = int(ctx.positions.max()) + 1 if ctx.positions is not None else T
            ctx = replace(ctx, block_ids=block_ids(L, 0, default_block, device))
        if ctx.block_ids is None:
            return ctx
        pos = ctx.positions
        if pos is None:
            q = ctx.block_ids[:, :T]
        else:
            q = ctx.block_ids.expand(pos.shape[0], -1).gather(1, pos)
        return replace(ctx, query_blocks=q)

    def mask_args(self, keys: int) -> dict[str, Any]:
        """The keyword arguments of kernels.attention that carry this context's mask over `keys` keys."""
        if self.attn_mask is not None:
            return {"mask": self.attn_mask}
        if self.query_blocks is None:
            return {}
        return {"q_blocks": self.query_blocks, "k_blocks": self.block_ids[:, :keys]}

    def select_outputs(self, x: torch.Tensor, shift: bool = False) -> torch.Tensor:
        """Hidden states [B,T,C] at output_positions, before the norm and the output head.

        With `shift` (models whose output at i-1 predicts token i, like Dream) each position reads
        the hidden state one to its left, the first position its own; callers that run a window of
        columns start it one column early so that the left neighbour is inside it."""
        if self.output_positions is None:
            return torch.cat((x[:, :1], x[:, :-1]), dim=1) if shift else x
        idx = (self.output_positions - 1).clamp(min=0) if shift else self.output_positions
        return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None,
                  scale: float | None = None, causal: bool = False, invariant: bool = False) -> torch.Tensor:
        """A layer's attention under this context: q [B,H,T,D], k/v [B,Hk,S,D] -> [B,H,T,D]; packed rows
        (B = 1) go through kernels.varlen_attention, so each row costs its own tokens. `invariant`: the
        batch-invariant kernels (the server's --deterministic on)."""
        if self.cu_seqlens is None:
            return kernels.attention(q, k, v, seqlens=seqlens, scale=scale, causal=causal, invariant=invariant,
                                     **self.mask_args(k.shape[2]))
        blocks = {name: t[0] for name, t in self.mask_args(k.shape[2]).items()}  # [N] per token
        y = kernels.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                     self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen, scale,
                                     invariant=invariant, **blocks)
        return y.transpose(0, 1)[None]
