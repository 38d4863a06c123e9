"""Incremental detokenisation: the text of a canvas kept up to date step by step, decoding only what changed.

A canvas's text is the decode of each run of committed tokens, one placeholder per masked position
(`decode_canvas`). Committed tokens never change and masks only turn into tokens, so a run that existed at
the last step is either the same (its text is reused) or has grown. A run that grew to the right is
extended by decoding its new tokens after a few tokens of context: decode(ctx + new) minus decode(ctx)
is the new text (the context keeps SentencePiece's leading space and byte-fallback characters right),
checked to be an extension, else the run is decoded whole. Runs that grew to the left or were joined
by a filled gap lie inside the current block and are short: they are decoded whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from clients.protocol import MASK_PLACEHOLDER

Decode = Callable[[list[int]], str]
CONTEXT_TOKENS = 4  # tokens decoded again before the new ones: enough for a space or a split character
INCOMPLETE = "\ufffd"  # what a decoder shows for a character whose bytes are not all there yet


def extend(decode: Decode, text: str, ids: np.ndarray, start: int, end: int, new_end: int) -> str:
    """decode(ids[start:new_end]), given `text` == decode(ids[start:end]), decoding only from a few
    tokens before `end`."""
    if new_end == end:
        return text
    if end == start or text.endswith(INCOMPLETE):  # nothing to extend, or a character still open
        return decode(ids[start:new_end].tolist())
    ctx = max(start, end - CONTEXT_TOKENS)
    before = decode(ids[ctx:end].tolist())
    after = decode(ids[ctx:new_end].tolist())
    if before.endswith(INCOMPLETE) or not after.startswith(before):  # the context decodes differently
        return decode(ids[start:new_end].tolist())
    return text + after[len(before):]


def runs(is_mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of masked or of committed positions, left to right."""
    if not len(is_mask):
        return []
    bounds = [0, *(np.flatnonzero(is_mask[1:] != is_mask[:-1]) + 1).tolist(), len(is_mask)]
    return list(zip(bounds, bounds[1:], strict=False))


def decode_canvas(decode: Decode, canvas: Sequence[int] | np.ndarray, mask_id: int,
                placeholder: str = MASK_PLACEHOLDER) -> str:
    """The partly denoised canvas as text, one placeholder per masked position (decoded run by run)."""
    arr = np.asarray(canvas, dtype=np.int64)
    is_mask = arr == mask_id
    return "".join(placeholder * (b - a) if is_mask[a] else decode(arr[a:b].tolist()) for a, b in runs(is_mask))


class CanvasText:
    """decode_canvas of one request's canvas, step after step, decoding only the runs that changed."""

    def __init__(self, decode: Decode, mask_id: int, placeholder: str = MASK_PLACEHOLDER) -> None:
        self.decode, self.mask_id, self.placeholder = decode, mask_id, placeholder
        self._runs: dict[int, tuple[int, str]] = {}  # committed run start -> (end, text) at the last update

    def update(self, canvas: np.ndarray) -> str:
        """The text of `canvas`, a later state of the last canvas given (or a first one)."""
        is_mask = canvas == self.mask_id
        runs_now: dict[int, tuple[int, str]] = {}
        parts = []
        for a, b in runs(is_mask):
            if is_mask[a]:
                parts.append(self.placeholder * (b - a))
                continue
            old = self._runs.get(a)
            if old is not None and old[0] <= b:
                text = extend(self.decode, old[1], canvas, a, old[0], b)
            else:
                text = self.decode(canvas[a:b].tolist())
            runs_now[a] = (b, text)
            parts.append(text)
        self._runs = runs_now
        return "".join(parts)


class PrefixText:
    """decode(ids[:n]) of a left-to-right prefix that only grows, decoding only its new tokens."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.length, self.text = 0, ""

    def update(self, ids: np.ndarray, n: int) -> str:
        if n < self.length:  # never for a canvas (committed tokens stay): decode it afresh
            self.length, self.text = 0, ""
        self.text = extend(self.decode, self.text, ids, 0, self.length, n)
        self.length = n
        return self.text
