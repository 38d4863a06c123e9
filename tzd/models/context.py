"""What one forward pass needs besides token ids: positions, key lengths and an optional KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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

    def select_outputs(self, x: torch.Tensor, shift: bool = False) -> torch.Tensor:
        """Hidden states [B,T,C] at output_positions, before the norm and the output head.

        With `shift` (models whose output at i-1 predicts token i, like Dream) each position reads
        the hidden state one to its left, the first position its own; callers that run a window of
        columns start it one column early so that the left neighbour is inside it."""
        if self.output_positions is None:
            return torch.cat((x[:, :1], x[:, :-1]), dim=1) if shift else x
        idx = (self.output_positions - 1).clamp(min=0) if shift else self.output_positions
        return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
