"""Infilling: what follows a request's prompt when it is not just masks to the end of the row.

A row is prompt + canvas + suffix. The canvas is the only region the sampler unmasks; its gaps are the
masked positions, and fixed text may sit between gaps (several gaps at once). The suffix is fixed context
after the canvas: a bidirectional model sees it at every step, and it is never part of the output. A
plain request is the special case of one gap and no suffix (no Layout at all).

EOS committed inside a gap is padding: it is removed from that gap's text (a gap is an upper bound on the
length of its fill) and never ends the request early, so the suffix and the later gaps are always kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GAP = -1  # a canvas position to fill, in Layout.fill


@dataclass(frozen=True)
class Layout:
    """`fill`: the canvas, fixed token ids where text is given and GAP where the model writes; it starts
    and ends with a gap (text before the first gap is the prompt, after the last the suffix). `suffix`:
    the fixed token ids after the canvas."""

    fill: tuple[int, ...]
    suffix: tuple[int, ...] = ()

    @classmethod
    def gap(cls, length: int, suffix: Sequence[int]) -> Layout:
        """One gap of `length` positions before `suffix` (OpenAI's completions `suffix`)."""
        return cls((GAP,) * length, tuple(suffix))

    @classmethod
    def of_parts(cls, parts: Sequence[int | Sequence[int]]) -> tuple[list[int], Layout]:
        """(prompt ids, layout) of alternating parts: a gap length (int) or fixed token ids (a sequence).
        Adjacent parts of one kind merge; leading text is the prompt, trailing text the suffix."""
        merged: list[int | list[int]] = []
        for p in parts:
            if isinstance(p, int) and merged and isinstance(merged[-1], int):
                merged[-1] += p
            elif not isinstance(p, int) and merged and not isinstance(merged[-1], int):
                merged[-1] = [*merged[-1], *p]
            else:
                merged.append(p if isinstance(p, int) else list(p))
        prompt = merged.pop(0) if merged and not isinstance(merged[0], int) else []
        suffix = merged.pop() if merged and not isinstance(merged[-1], int) else []
        fill: list[int] = []
        for p in merged:
            fill += [GAP] * p if isinstance(p, int) else p
        return prompt, cls(tuple(fill), tuple(suffix))  # type: ignore[arg-type]

    @property
    def canvas_len(self) -> int:
        return len(self.fill)

    @property
    def masked(self) -> int:
        """Positions the model fills (the gaps' total)."""
        return sum(t == GAP for t in self.fill)

    def canvas(self, mask_id: int) -> np.ndarray:
        """The canvas at the first step: the mask id in the gaps, the fixed ids elsewhere."""
        c = np.array(self.fill, dtype=np.int64)
        return np.where(c == GAP, mask_id, c)

    def gaps(self) -> list[tuple[int, int]]:
        """(offset, length) of each gap in the canvas, left to right."""
        is_gap = np.array(self.fill) == GAP
        edges = np.flatnonzero(np.diff(np.concatenate([[False], is_gap, [False]]).astype(np.int8)))
        return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
