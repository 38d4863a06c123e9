"""Torch reference implementations of the kernels: the ground truth for tests and the CPU path."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def rope_cache(seq_len: int, rotary_dim: int, base: float = 10000.0,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [seq_len, rotary_dim // 2] (fp32) for NeoX half-split RoPE."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    # x: [B,T,H,D]; cos2 = [cos, cos], sin2 = [-sin, sin] over the R rotated dims, broadcast to [.,T,1,R].
    # x*cos2 + swap_halves(x)*sin2 is the half-split rotation, in fp32, with one rounding at the end.
    R = cos2.shape[-1]
    xr = x[..., :R].float()
    swapped = torch.cat((xr[..., R // 2:], xr[..., :R // 2]), dim=-1)
    rotated = (xr * cos2 + swapped * sin2).to(x.dtype)
    return rotated if R == x.shape[-1] else torch.cat((rotated, x[..., R:]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first R dims of q [B,T,H,D] and k [B,T,Hk,D] (NeoX half split); the rest pass through."""
    T = q.shape[1]
    c, s = (cos[:T], sin[:T]) if positions is None else (cos[positions], sin[positions])
    cos2 = torch.cat((c, c), dim=-1).unsqueeze(-2)
    sin2 = torch.cat((-s, s), dim=-1).unsqueeze(-2)
    if q.dtype != k.dtype:
        return _rotate(q, cos2, sin2), _rotate(k, cos2, sin2)
    # one rotation for both: a few large ops cost less than twice as many small ones on CPU
    qk = _rotate(torch.cat((q, k), dim=2), cos2, sin2)
    return qk.split([q.shape[2], k.shape[2]], dim=2)


def block_mask(q_blocks: torch.Tensor | None = None, k_blocks: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The [B,1,T,S] bool mask (True = attend) of block ids (key j seen by query i iff k_blocks[b,j] <=
    q_blocks[b,i]) or of an explicit mask; None when there is neither."""
    if mask is not None:
        return mask
    if q_blocks is None:
        return None
    return k_blocks[:, None, None, :] <= q_blocks[:, None, :, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False, q_blocks: torch.Tensor | None = None,
              k_blocks: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over q [B,H,T,D], k/v [B,Hk,S,D]; keys at index >= seqlens[b] are masked out.

    Bidirectional unless `causal` (used only by the autoregressive judge) or block-causal: with
    q_blocks [B,T] and k_blocks [B,S], query i sees key j iff k_blocks[b,j] <= q_blocks[b,i]; `mask`
    [B,1,T,S] (True = attend) gives any other layout. Every query must see at least one key.
    """
    mask = block_mask(q_blocks, k_blocks, mask)
    if seqlens is not None:
        S = k.shape[2]
        keep = torch.arange(S, device=k.device)[None, :] < seqlens.to(k.device)[:, None]  # [B,S]
        mask = keep[:, None, None, :] if mask is None else mask & keep[:, None, None, :]
    if causal and mask is not None:
        T, S = q.shape[2], k.shape[2]
        tri = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        mask = mask & tri
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def check_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                 q_blocks: torch.Tensor | None = None, k_blocks: torch.Tensor | None = None) -> None:
    """Shape checks of varlen_attention's arguments (no device sync: values are not read)."""
    name = "varlen_attention"
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"{name}: q [Nq,H,D], k and v [Nk,Hk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: k/v must share D with q and Hk must divide H; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    for field, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.shape[0] < 1 or cu.dtype.is_floating_point or cu.dtype == torch.bool:
            raise ValueError(f"{name}: {field} must be a 1-D integer tensor [B+1]; got {cu.dtype} "
                             f"{tuple(cu.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{name}: cu_seqlens_q and cu_seqlens_k must both be [B+1]; got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    for field, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        try:
            ok = operator.index(m) >= 0
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name}: {field} must be an int >= 0; got {m!r}")
    if (q_blocks is None) != (k_blocks is None):
        raise ValueError(f"{name}: q_blocks and k_blocks go together (one was None)")
    if q_blocks is not None:
        for field, blocks, n in (("q_blocks", q_blocks, q.shape[0]), ("k_blocks", k_blocks, k.shape[0])):
            if blocks.shape != (n,) or blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
                raise ValueError(f"{name}: {field} must be integer block ids [{n}]; got {blocks.dtype} "
                                 f"{tuple(blocks.shape)}")


LENGTH_GROUPS = 4  # varlen_attention's reference pads rows within this many groups of similar lengths


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None,
                     q_blocks: torch.Tensor | None = None, k_blocks: torch.Tensor | None = None,
                     attend: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Packed attention over q [Nq,H,D], k/v [Nk,Hk,D] (rows cu_seqlens[b]:cu_seqlens[b+1]) -> [Nq,H,D].

    `attend` runs each padded group (default: this module's `attention`; the batch-invariant one in
    deterministic mode, so that a row's result does not follow its group's padding).

    Bidirectional within each row, or block-causal with per-token ids q_blocks [Nq] / k_blocks [Nk]. A
    query with no key gets zeros. No loop over rows: the rows are sorted by length into at most
    LENGTH_GROUPS groups; each group's tokens are scattered into a padded [rows, longest, H, D] batch,
    run through `attention` with the key lengths as seqlens (SDPA with a key-padding mask), and gathered
    back. Kept over one SDPA on all tokens with a block-diagonal mask, whose cost grows with the square
    of the total token count: the mask wins only on tiny totals, where both are cheap (bench/kernels.py).
    """
    check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_blocks, k_blocks)
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    plan = _varlen_plan(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    H, D = q.shape[1], q.shape[2]
    parts = []
    for g in plan.groups:
        qp = q[g.q_map].view(g.rows, g.Lq, H, D).transpose(1, 2)
        kp = k[g.k_map].view(g.rows, g.Lk, *k.shape[1:]).transpose(1, 2)
        vp = v[g.k_map].view(g.rows, g.Lk, *v.shape[1:]).transpose(1, 2)
        blocks = {}
        if q_blocks is not None:  # padded keys are masked by seqlens, padded queries dropped
            blocks = {"q_blocks": q_blocks[g.q_map].view(g.rows, g.Lq).long(),
                      "k_blocks": k_blocks[g.k_map].view(g.rows, g.Lk).long()}
        res = (attend or attention)(qp, kp, vp, g.lens_k, scale, **blocks)  # [G,H,Lq,D]
        parts.append(res.transpose(1, 2).reshape(g.rows * g.Lq, H, D)[g.out_index])
    if not parts:
        return q.new_zeros(q.shape)
    return torch.cat(parts)[plan.inverse] if len(parts) > 1 else parts[0][plan.inverse]


@dataclass
class _Group:
    rows: int  # rows in the group
    Lq: int  # their longest query and key counts: the padded shape
    Lk: int
    q_map: torch.Tensor  # [rows * Lq]: the packed query token of each padded slot (token 0 for padding)
    k_map: torch.Tensor  # [rows * Lk]
    lens_k: torch.Tensor  # [rows]: key counts (seqlens of the padded attention)
    out_index: torch.Tensor  # the padded slot of each of the group's query tokens, in token order


@dataclass
class _VarlenPlan:
    groups: list[_Group]
    inverse: torch.Tensor  # [Nq]: where each query token's output is in the groups' concatenated outputs


def _spans(starts: np.ndarray, lens: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """(padded slot, packed token) of every token of rows starting at `starts` with `lens` tokens, row j
    padded to L slots: slot j * L + t holds token starts[j] + t."""
    within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(np.arange(len(lens)), lens) * L + within, np.repeat(starts, lens) + within


_last_plan: tuple[tuple, torch.Tensor, torch.Tensor, _VarlenPlan] | None = None


def _varlen_plan(cu_q: torch.Tensor, cu_k: torch.Tensor, nq: int, nk: int, max_q: int, max_k: int) -> _VarlenPlan:
    """The grouping of varlen_attention, computed once per forward (every layer passes the same
    cu_seqlens: the last plan is kept, checked against a copy of their values) and validated then."""
    global _last_plan
    key = (id(cu_q), id(cu_k), nq, nk, max_q, max_k)
    if _last_plan is not None and _last_plan[0] == key and torch.equal(_last_plan[1], cu_q) \
            and torch.equal(_last_plan[2], cu_k):
        return _last_plan[3]
    cq, ck = cu_q.cpu().long().numpy(), cu_k.cpu().long().numpy()  # one read-back per forward, not per layer
    for field, cu, n in (("cu_seqlens_q", cq, nq), ("cu_seqlens_k", ck, nk)):
        if cu[0] != 0 or cu[-1] != n or (np.diff(cu) < 0).any():
            raise ValueError(f"varlen_attention: {field} must rise from 0 to {n} (the packed tokens); got "
                             f"{cu.tolist()}")
    lens_q, lens_k = np.diff(cq), np.diff(ck)
    if lens_q.max(initial=0) > max_q or lens_k.max(initial=0) > max_k:
        raise ValueError(f"varlen_attention: a row is longer than max_seqlen_q={max_q} / max_seqlen_k={max_k} "
                         f"(longest: {lens_q.max(initial=0)} / {lens_k.max(initial=0)})")
    # Rows grouped by length (at most LENGTH_GROUPS groups of consecutive lengths, each padded to its own
    # longest): padding every row to the batch's longest made attention cost rows x longest^2, about
    # twice what rows of mixed lengths hold. A loop over a few groups, never over rows.
    B = len(lens_q)
    by_len = np.argsort(lens_k, kind="stable")
    n_groups = min(LENGTH_GROUPS, B)
    device = cu_q.device
    groups, order = [], []
    for gi in range(n_groups):
        members = by_len[gi * B // n_groups:(gi + 1) * B // n_groups]
        if not len(members) or not lens_q[members].sum():
            continue
        G, Lq, Lk = len(members), max(int(lens_q[members].max()), 1), max(int(lens_k[members].max()), 1)
        q_map, k_map = np.zeros(G * Lq, dtype=np.int64), np.zeros(G * Lk, dtype=np.int64)
        q_slots, q_tokens = _spans(cq[members], lens_q[members], Lq)
        k_slots, k_tokens = _spans(ck[members], lens_k[members], Lk)
        q_map[q_slots], k_map[k_slots] = q_tokens, k_tokens
        order.append(q_tokens)
        groups.append(_Group(G, Lq, Lk, torch.from_numpy(q_map).to(device), torch.from_numpy(k_map).to(device),
                             torch.from_numpy(lens_k[members].copy()).to(device), torch.from_numpy(q_slots).to(device)))
    inverse = np.empty(nq, dtype=np.int64)
    if order:
        inverse[np.concatenate(order)] = np.arange(nq)
    plan = _VarlenPlan(groups, torch.from_numpy(inverse).to(device))
    _last_plan = (key, cu_q.clone(), cu_k.clone(), plan)
    return plan
