"""Block layout of block-causal (block diffusion) models: which block each position belongs to.

Position p sees every position whose block id is <= its own: its own block in both directions and
every earlier block. At serving time the prompt is its own leading span, cut into blocks of `block`
positions from position 0 (the last one may be shorter), and the generated blocks count from the
first generated token, so no block mixes prompt and generated tokens and a prompt block's keys
depend only on the tokens before and in it (what lets requests share them). Training uses the same
layout with a prompt length drawn per sequence (tzd.diffusion.block_forward_process), so the model
sees the block boundaries it will be served with.
"""

from __future__ import annotations

import torch


def block_ids(length: int, prompt_len: torch.Tensor | int, block: int,
              device: torch.device | str | None = None, align: str = "prompt") -> torch.Tensor:
    """Block id of positions 0..length-1 for each row: [B, length] (or [1, length] for an int prompt_len).

    `align` "absolute" is SDAR's layout instead: blocks at multiples of `block` from position 0 whatever the
    prompt (its tail shares the first generated block)."""
    if isinstance(prompt_len, int):
        prompt_len = torch.tensor([prompt_len], device=device)
    p = torch.arange(length, device=prompt_len.device)[None, :]
    if align == "absolute":
        return (p // block).expand(prompt_len.shape[0], -1)
    P = prompt_len.long()[:, None]
    prompt_blocks = (P + block - 1) // block
    return torch.where(p < P, p // block, prompt_blocks + (p - P).clamp(min=0) // block)


def token_block_ids(positions: torch.Tensor, prompt_len: torch.Tensor, block: int, align: str = "prompt"
                    ) -> torch.Tensor:
    """block_ids elementwise: the block of each token at `positions` in a row whose prompt is `prompt_len`
    (same shapes; packed rows give one entry per token)."""
    if align == "absolute":
        return positions // block
    prompt_blocks = (prompt_len + block - 1) // block
    return torch.where(positions < prompt_len, positions // block,
                       prompt_blocks + (positions - prompt_len).clamp(min=0) // block)


def two_stream_mask(blocks: torch.Tensor) -> torch.Tensor:
    """[B,1,2T,2T] bool mask of BD3-LM's training layout: the noised sequence (first T) beside the clean one.

    A noised token of block b sees the noised tokens of block b and the clean tokens of blocks < b; a
    clean token of block b sees the clean tokens of blocks <= b. No clean token sees a noised one, so
    every block is trained against clean context exactly as it is sampled, all in one forward.
    """
    q = blocks[:, :, None]
    k = blocks[:, None, :]
    noised_noised = q == k
    noised_clean = k < q
    clean_clean = k <= q
    clean_noised = torch.zeros_like(noised_noised)
    top = torch.cat((noised_noised, noised_clean), dim=2)
    bottom = torch.cat((clean_noised, clean_clean), dim=2)
    return torch.cat((top, bottom), dim=1)[:, None]
