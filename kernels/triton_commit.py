"""The sampler's commit choice in one Triton launch (tzd.sampling.rules.select_commits on CUDA).

Per row of a step's open block offsets: the ceil(masked / steps_left) most confident masked positions
(or the count the host computed), with a threshold every masked position at or above it when that is
more, at most the masked ones. The torch rule takes a dozen ops (two argsorts, gathers, sums), each a
launch on a [rows, P] matrix that holds a few hundred values. Here one program per row loads its P
confidences once and ranks them against each other ([P, P] comparisons: P is a block's width, at most
a few hundred), the order the torch rule's stable descending sort gives (ties by position), and writes
the choice. Entropy-bounded rows stay on the torch rule (their prefix sums in rank order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["select_commits"]


@triton.jit
def _select(conf_ptr, mask_ptr, count_ptr, thr_ptr, out_ptr, P, stride_c, stride_m, stride_o,
            HAS_THRESHOLD: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK_P)
    inside = i < P
    is_mask = tl.load(mask_ptr + row * stride_m + i, mask=inside, other=0) != 0
    conf = tl.load(conf_ptr + row * stride_c + i, mask=inside, other=0.0).to(tl.float32)
    conf = tl.where(is_mask, conf, float("-inf"))
    count = tl.load(count_ptr + row).to(tl.int32)
    if HAS_THRESHOLD:
        remaining = tl.sum(is_mask.to(tl.int32), axis=0)
        thr = tl.load(thr_ptr + row).to(tl.float32)
        above = tl.sum((is_mask & (conf >= thr)).to(tl.int32), axis=0)
        count = tl.minimum(tl.where(thr > 0, tl.maximum(count, above), count), remaining)
    # each position's place in the descending order, ties by position (torch's stable sort); the padding
    # past P ranks last of all (an index past every real one, -inf)
    ci = conf[:, None]
    cj = conf[None, :]
    before = (cj > ci) | ((cj == ci) & (i[None, :] < i[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    chosen = (rank < count) & is_mask
    tl.store(out_ptr + row * stride_o + i, chosen.to(tl.int8), mask=inside)


def select_commits(conf: torch.Tensor, is_mask: torch.Tensor, count: torch.Tensor,
                   threshold: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, P] bool: which masked positions to commit (rules.select_commits without an entropy bound).
    `conf` [rows, P] float, `is_mask` [rows, P] bool, `count` [rows] the schedule's counts, `threshold`
    [rows] float (0 = none) or None where no row has one."""
    rows, P = conf.shape
    out = torch.empty((rows, P), dtype=torch.int8, device=conf.device)
    if rows == 0 or P == 0:
        return out.bool()
    mask8 = is_mask.to(torch.int8)
    count = count.to(torch.int32).contiguous()
    thr = threshold.float().contiguous() if threshold is not None else count  # unread without a threshold
    block = max(triton.next_power_of_2(P), 16)
    _select[(rows,)](conf, mask8, count, thr, out, P, conf.stride(0), mask8.stride(0), out.stride(0),
                     HAS_THRESHOLD=threshold is not None, BLOCK_P=block, num_warps=4 if block <= 128 else 8)
    return out.bool()
