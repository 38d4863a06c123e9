"""Block ids -> per-query key limits, the form the Triton attention kernels take block-causal masks in.

Block-causal: query i sees key j iff k_blocks[j] <= q_blocks[i]. With key block ids non-decreasing
(blocks are contiguous spans; tzd.models.blocks), the keys query i sees are exactly the first
limit[i] = searchsorted(k_blocks, q_blocks[i], right=True) of its row. One torch op per call turns the
mask into these limits; a kernel then masks with `j < limit[i]` and skips every key tile at or past
the largest limit of its query tile (the tiles above the block diagonal). The kernels do not check that
key block ids are non-decreasing (it would cost a device sync); the torch reference needs no order.
"""

from __future__ import annotations

import torch

__all__ = ["key_limits", "varlen_key_limits", "token_rows"]


def _check_blocks(name: str, blocks: torch.Tensor | None, B: int, n: int, what: str) -> torch.Tensor:
    if blocks is None:
        raise ValueError("attention: q_blocks and k_blocks go together (one was None)")
    if blocks.dim() != 2 or blocks.shape[0] not in (1, B) or blocks.shape[1] != n:
        raise ValueError(f"attention: {name} must be [B,{what}]=[{B},{n}] (or [1,{n}]); got {tuple(blocks.shape)}")
    if blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        raise ValueError(f"attention: {name} must hold integer block ids; got {blocks.dtype}")
    return blocks


def key_limits(q_blocks: torch.Tensor | None, k_blocks: torch.Tensor | None, B: int, T: int, S: int,
               seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """[B,T] int32: how many leading keys each query sees (keys j < limit[b,i]), at most seqlens[b] and S."""
    qb = _check_blocks("q_blocks", q_blocks, B, T, "T").long()
    kb = _check_blocks("k_blocks", k_blocks, B, S, "S").long()
    if kb.shape[0] == 1:  # one key layout for the whole batch: a 1-D sorted sequence takes any values shape
        lim = torch.searchsorted(kb[0].contiguous(), qb.contiguous(), right=True, out_int32=True)
    else:
        lim = torch.searchsorted(kb.contiguous(), qb.expand(B, T).contiguous(), right=True, out_int32=True)
    lim = lim.expand(B, T)
    if seqlens is not None:
        lim = torch.minimum(lim, seqlens.to(device=lim.device, dtype=torch.int32).clamp(0, S)[:, None])
    return lim.contiguous()


def token_rows(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int64: the row of each packed token (row b holds tokens cu[b]:cu[b+1]; empty rows hold none)."""
    tokens = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def varlen_key_limits(q_blocks: torch.Tensor, k_blocks: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """[Nq] int32: for each packed query, the packed index one past the last key it sees.

    Block ids must lie in [0, 2**31) and be non-decreasing along each row's keys. Every row's keys
    are sorted by (row, block) with one key (row << 32) + block; a query's limit is then one
    searchsorted over all rows at once, and lands inside its own row: in [cu_k[b], cu_k[b+1]].
    """
    Nq, Nk = q_blocks.shape[0], k_blocks.shape[0]
    rows_q = token_rows(cu_seqlens_q, Nq).long()
    rows_k = token_rows(cu_seqlens_k, Nk).long()
    keys = (rows_k << 32) + k_blocks.long()
    return torch.searchsorted(keys, (rows_q << 32) + q_blocks.long(), right=True, out_int32=True)
