"""Per-token scores of one request, gathered from its step events: each canvas position's log-probability
at the step it was committed (the probability the commit rule saw, un-tempered), and the top alternatives
then where the request asked (SamplingParams.top_logprobs). Host-side; the sampler computes them on the
device at commit time and the step's one copy brings them back (sampler.Commits)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tzd.sampling.slot import SlotStep


@dataclass
class TokenScore:
    position: int  # canvas position, from the first generated token
    logprob: float
    top: list[tuple[int, float]]  # (id, log-probability) of the most likely tokens then, best first


class TokenScores:
    """The scores of a canvas of `length` positions, `k` alternatives each (0: none)."""

    def __init__(self, length: int, k: int = 0) -> None:
        self.logprob = np.full(length, -np.inf, dtype=np.float32)
        self.k = k
        self.top_ids = np.zeros((length, k), dtype=np.int64)
        self.top_logprobs = np.full((length, k), -np.inf, dtype=np.float32)

    def add(self, ev: SlotStep) -> None:
        """Record the commits of one step."""
        if ev.probs is not None:
            with np.errstate(divide="ignore"):  # probability 0 (far out in a sampled tail): -inf
                self.logprob[ev.positions] = np.log(ev.probs)
        if self.k and ev.top_ids is not None:
            self.top_ids[ev.positions], self.top_logprobs[ev.positions] = ev.top_ids, ev.top_logprobs

    def at(self, positions: Sequence[int]) -> list[TokenScore]:
        """The scores of `positions` (a result's tokens), in order."""
        return [TokenScore(p, float(self.logprob[p]),
                           list(zip(self.top_ids[p].tolist(), self.top_logprobs[p].tolist(), strict=True)))
                for p in positions]
