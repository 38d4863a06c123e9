"""The per-step decision, vectorised over a batch: which token each masked position would take,
how confident that is, and which positions are committed now."""

from __future__ import annotations

import torch

from tzd.sampling import rng


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (k > 0) and top-p (p < 1) exclude; logits [B,P,V], top_k/top_p [B]."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)[:, None, None]
    probs = sorted_logits.float().softmax(dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    drop_sorted = (rank >= k) | ((probs.cumsum(dim=-1) - probs) >= top_p[:, None, None])
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seed: torch.Tensor, step: torch.Tensor, positions: torch.Tensor, sampling: bool,
                  filtering: bool) -> torch.Tensor:
    """Greedy argmax, or where temperature > 0 an exact sample of softmax(filtered / T) by Gumbel-max
    in float64 with counter-based noise keyed by (seed, step, position). `sampling` / `filtering`: some
    row has temperature > 0 / top-k or top-p on (host flags, so that no device value is read back)."""
    greedy = logits.argmax(dim=-1)
    if not sampling:
        return greedy
    filtered = logits
    if filtering:
        filtered = filter_top_k_top_p(logits, top_k, top_p)
    filtered = filtered.double()
    noise = rng.gumbel(rng.keys(seed, step, positions, rng.STREAM_GUMBEL), logits.shape[-1])
    temp = temperature.double().clamp(min=1e-6)[:, None, None]
    sampled = (filtered / temp + noise).argmax(dim=-1)
    return torch.where((temperature > 0)[:, None], sampled, greedy)


def confidence(logits: torch.Tensor, tokens: torch.Tensor, random_remask: torch.Tensor, seed: torch.Tensor,
               step: torch.Tensor, positions: torch.Tensor, any_random: bool) -> torch.Tensor:
    """Un-tempered softmax probability of the chosen token; uniform noise for `random` remasking rows."""
    conf = logits.float().softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    if any_random:
        u = rng.uniform(rng.keys(seed, step, positions, rng.STREAM_REMASK)).float()
        conf = torch.where(random_remask[:, None], u, conf)
    return conf


def select_commits(conf: torch.Tensor, is_mask: torch.Tensor, steps_left: torch.Tensor,
                   threshold: torch.Tensor, any_threshold: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which masked positions to commit: the ceil(masked / steps_left) most confident (LLaDA's linear
    schedule), or with a threshold every position at or above it if that is more; always >= 1.

    Returns (select [B,P] bool, count [B]).
    """
    conf = conf.masked_fill(~is_mask, float("-inf"))
    remaining = is_mask.sum(dim=1)
    count = torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor")
    if any_threshold:
        above = ((conf >= threshold[:, None]) & is_mask).sum(dim=1)
        count = torch.where(threshold > 0, torch.maximum(count, above), count)
    count = torch.minimum(count.clamp(min=1), remaining)
    order = conf.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))
    return (rank < count[:, None]) & is_mask, count
