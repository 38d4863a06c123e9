"""The per-step decision, vectorised over a batch: which token each masked position would take,
how confident that is, and which positions are committed now."""

from __future__ import annotations

import numpy as np
import torch

from tzd.sampling import rng

# Elements of [rows, V] per chunk of the top-k/top-p filter: its sort keeps values, int64 indices, the
# probabilities and their cumulative sum, so it runs on bounded groups of (request, position) rows
# (at the default model's V = 4096 up to 1024 rows, a whole batch of 16 x 32; at V = 126k 33 rows).
FILTER_CHUNK = 1 << 22


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (k > 0) and top-p (p < 1) exclude; logits [B,P,V], top_k/top_p [B]."""
    B, P, V = logits.shape
    flat = logits.reshape(B * P, V)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V).repeat_interleave(P)
    p = top_p.repeat_interleave(P)
    out = torch.empty_like(flat)
    rows = max(1, FILTER_CHUNK // V)
    rank = torch.arange(V, device=logits.device)
    for lo in range(0, B * P, rows):  # each row is filtered on its own: the grouping changes no result
        part = flat[lo:lo + rows]
        sorted_logits, order = part.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (rank >= k[lo:lo + rows, None]) | ((probs.cumsum(dim=-1) - probs) >= p[lo:lo + rows, None])
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out[lo:lo + rows] = part.masked_fill(drop, float("-inf"))
    return out.view(B, P, V)


# Vocabulary columns per chunk of the Gumbel-max sample: its float64 noise and int64 keys then take
# [B,P,GUMBEL_CHUNK] at a time, not [B,P,V] (at V = 126k, batch 16, block 32 that would be 0.5 GB each).
GUMBEL_CHUNK = 8192


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of logits / T + Gumbel noise, in float64, chunk by chunk.

    The noise of token t is a function of (key, t) only, so the chunking changes no draw: a strictly
    greater maximum replaces the running one, which keeps the first index on ties, as argmax does."""
    V = logits.shape[-1]
    temp = temperature.double().clamp(min=1e-6)[:, None, None]
    best_val = best_idx = None
    for lo in range(0, V, GUMBEL_CHUNK):  # ceil(V / chunk) iterations, independent of batch and positions
        hi = min(V, lo + GUMBEL_CHUNK)
        scores = logits[..., lo:hi].double() / temp + rng.gumbel(key, hi - lo, first_token=lo)
        idx = scores.argmax(dim=-1)  # the first maximal index, as a full-vocabulary argmax gives
        val = scores.gather(-1, idx[..., None]).squeeze(-1)
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + lo, best_idx)
    return best_idx


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), the same indices (the first maximum on ties, a NaN's index where a row has
    one). On CPU through numpy's argmax, which vectorises where torch's CPU argmax runs a scalar loop
    (bench.engine's host-overhead figures show the difference)."""
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float64):
        return logits.argmax(dim=-1)
    return torch.from_numpy(logits.detach().numpy().argmax(axis=-1))


def choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seed: torch.Tensor, step: torch.Tensor, positions: torch.Tensor, sampling: bool,
                  filtering: bool) -> torch.Tensor:
    """Greedy argmax, or where temperature > 0 an exact sample of softmax(filtered / T) by Gumbel-max
    in float64 with counter-based noise keyed by (seed, step, position). `sampling` / `filtering`: some
    row has temperature > 0 / top-k or top-p on (host flags, so that no device value is read back)."""
    greedy = argmax(logits)
    if not sampling:
        return greedy
    filtered = logits
    if filtering:
        filtered = filter_top_k_top_p(logits, top_k, top_p)
    sampled = gumbel_argmax(filtered, temperature, rng.keys(seed, step, positions, rng.STREAM_GUMBEL))
    return torch.where((temperature > 0)[:, None], sampled, greedy)


def token_probability(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B,P] float32: the un-tempered softmax probability of each chosen token."""
    return logits.float().softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def confidence(logits: torch.Tensor, tokens: torch.Tensor, random_remask: torch.Tensor, seed: torch.Tensor,
               step: torch.Tensor, positions: torch.Tensor, any_random: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, probability): the un-tempered softmax probability of the chosen token, and the
    confidence the commit rule ranks by: that probability, or uniform noise for `random` remasking rows."""
    prob = token_probability(logits, tokens)
    conf = prob
    if any_random:
        u = rng.uniform(rng.keys(seed, step, positions, rng.STREAM_REMASK)).float()
        conf = torch.where(random_remask[:, None], u, prob)
    return conf, prob


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities) [B,P,k] of the k most likely tokens of each position, most likely first
    (un-tempered log-softmax: the distribution `confidence` reads)."""
    return tuple(reversed(logits.float().log_softmax(dim=-1).topk(k, dim=-1)))  # type: ignore[return-value]


def _halving_sum(x: torch.Tensor) -> torch.Tensor:
    """x.sum(dim=-1) by pairwise halving: elementwise adds in an order fixed by the last dimension's size
    alone. torch's sum picks its reduction order by the shape (CUDA widens its blocks when there are few
    rows; CPU threads split a row when there are few), which would make a row's sum depend on its batch."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        folded = x[..., :half] + x[..., half:2 * half]
        if x.shape[-1] % 2:  # the odd last column joins the first
            folded[..., :1] += x[..., -1:]
        x = folded
    return x[..., 0]


def _prefix_sums(x: torch.Tensor) -> torch.Tensor:
    """x.cumsum(dim=1) by doubling (Hillis-Steele): each sum's order depends on its position only, not on
    how many columns follow it (a row's padding) nor on the batch."""
    shift = 1
    while shift < x.shape[1]:
        x = torch.cat([x[:, :shift], x[:, shift:] + x[:, :-shift]], dim=1)
        shift *= 2
    return x


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B,P] entropy in nats of softmax(logits) (un-tempered, the probabilities `confidence` reads; the mask
    id's -inf logit is probability 0 and adds nothing), in float32, batch-invariant.

    As log Z - sum p (x - max): no log over the vocabulary (-sum p log p would take one per element, the
    dearest op here on CPU), only of the top probability, exp(0) / Z. That log goes through `entr`, which
    CPU runs as a scalar loop: torch.log's vectorised loop takes a tensor's tail element by element, another
    rounding for whichever rows a batch puts there."""
    x = logits.float()
    p = x.softmax(dim=-1)
    # 0 * -inf at the mask id (and any -inf logit) is NaN: those terms are 0 (nan_to_num is several times
    # cheaper than a where on CPU)
    dot = _halving_sum((p * (x - x.amax(dim=-1, keepdim=True))).nan_to_num(nan=0.0))
    top = p.amax(dim=-1)
    return (torch.special.entr(top) / top - dot).clamp(min=0.0)  # entr(q) / q = -log q = log Z


def schedule_count(remaining: np.ndarray, steps_left: np.ndarray) -> np.ndarray:
    """Positions LLaDA's linear schedule commits now: ceil(masked / steps_left), at least 1, at most masked
    (host arrays: the batch knows both before the step)."""
    return np.minimum(np.maximum(-(-remaining // steps_left), 1), remaining)


def select_commits(conf: torch.Tensor, is_mask: torch.Tensor, steps_left: torch.Tensor,
                   threshold: torch.Tensor, any_threshold: bool, count: torch.Tensor | None = None,
                   entropy: torch.Tensor | None = None, entropy_bound: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which masked positions to commit: the ceil(masked / steps_left) most confident (LLaDA's linear
    schedule), or with a threshold every position at or above it if that is more, or with an entropy
    bound (rows where it is > 0; `entropy` [B,P] given) the longest run of the most confident whose
    summed entropy stays <= the bound if that is more; always >= 1.
    `count`: that schedule's count where the caller has it (schedule_count), else computed here.

    Returns (select [B,P] bool, count [B]).
    """
    conf = conf.masked_fill(~is_mask, float("-inf"))
    remaining = None
    if count is None:
        remaining = is_mask.sum(dim=1)
        count = torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor")
        count = torch.minimum(count.clamp(min=1), remaining)
    if any_threshold:
        remaining = is_mask.sum(dim=1) if remaining is None else remaining
        above = ((conf >= threshold[:, None]) & is_mask).sum(dim=1)
        count = torch.minimum(torch.where(threshold > 0, torch.maximum(count, above), count), remaining)
    order = conf.argsort(dim=1, descending=True, stable=True)
    if entropy is not None:
        # the masked positions come first in `order`; an infinite entropy after them ends every run there
        ranked = entropy.masked_fill(~is_mask, float("inf")).gather(1, order)
        within = (_prefix_sums(ranked) <= entropy_bound[:, None]).sum(dim=1)
        remaining = is_mask.sum(dim=1) if remaining is None else remaining
        count = torch.minimum(torch.where(entropy_bound > 0, torch.maximum(count, within), count), remaining)
    rank = order.argsort(dim=1)  # the inverse permutation: each position's place in the order
    return (rank < count[:, None]) & is_mask, count


def _prefix_sums_host(x: np.ndarray) -> np.ndarray:
    """_prefix_sums on a host array: the same additions in the same order, so the same float32 sums."""
    shift = 1
    while shift < x.shape[1]:
        x = np.concatenate([x[:, :shift], x[:, shift:] + x[:, :-shift]], axis=1)
        shift *= 2
    return x


def select_commits_host(conf: np.ndarray, is_mask: np.ndarray, count: np.ndarray, threshold: np.ndarray | None,
                        entropy: np.ndarray | None = None, entropy_bound: np.ndarray | None = None) -> np.ndarray:
    """select_commits on host arrays, for the CPU step: the same choice (tests/test_commit_host.py holds
    them equal) in a few numpy calls instead of a dozen torch ops, each of which costs more to dispatch on
    a [rows, P] matrix than it computes. `count` the schedule's counts (schedule_count); `threshold` float32
    [rows] (0 = none) or None where no row has one; `entropy_bound` float32 [rows] (0 = none) with `entropy`."""
    conf = np.where(is_mask, conf, np.float32(-np.inf))
    remaining = is_mask.sum(axis=1) if threshold is not None or entropy is not None else None
    if threshold is not None:
        above = ((conf >= threshold[:, None]) & is_mask).sum(axis=1)
        count = np.minimum(np.where(threshold > 0, np.maximum(count, above), count), remaining)
    order = np.argsort(-conf, axis=1, kind="stable")  # descending, ties by position (torch's stable sort)
    if entropy is not None:
        ranked = np.take_along_axis(np.where(is_mask, entropy, np.float32(np.inf)), order, axis=1)
        within = (_prefix_sums_host(ranked) <= entropy_bound[:, None]).sum(axis=1)
        count = np.minimum(np.where(entropy_bound > 0, np.maximum(count, within), count), remaining)
    taken = np.arange(order.shape[1])[None, :] < count[:, None]  # in confidence order: the first `count`
    select = np.empty_like(taken)
    select[np.arange(len(order))[:, None], order] = taken  # back to positions
    return select & is_mask
