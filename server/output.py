"""Turn the sampler's step events into what a client sees: step data, text deltas, the final result.

Runs on the engine's worker thread right after each step, so the event loop only routes the results.
Work here is per request and per run of tokens, never per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from clients.protocol import MASK_PLACEHOLDER, CommittedToken, StepEvent
from tzd.sampling import SlotStep, finish
from tzd.tokenizer import TextTokenizer

StreamMode = Literal["none", "events", "prefix"]  # /generate without stream, /generate stream, OpenAI stream


@dataclass
class Result:
    tokens: list[int]
    text: str
    finish_reason: str
    steps: int
    nfe: int
    committed: int  # positions committed when it finished (max_tokens unless EOS/stop ended it early)


@dataclass
class Update:
    """What one step means for one request's client."""

    event: StepEvent | None = None  # mode "events"
    delta: str = ""  # mode "prefix": text newly added to the committed left-to-right prefix
    result: Result | None = None  # once finished

    def merged(self, later: Update) -> Update:
        """This update and a later one as one (for a reader that fell behind): the later step's canvas, the
        tokens both committed, both deltas, the later result."""
        event = later.event
        if event is not None and self.event is not None:
            event = event.model_copy(update={"committed": self.event.committed + event.committed})
        return Update(event=event or self.event, delta=self.delta + later.delta, result=later.result)


def canvas_text(tokenizer: TextTokenizer, canvas: list[int], mask_id: int, placeholder: str = MASK_PLACEHOLDER) -> str:
    """The partly denoised canvas as text, one placeholder per masked position (decoded run by run)."""
    arr = np.asarray(canvas)
    is_mask = arr == mask_id
    if not is_mask.any():
        return tokenizer.decode(canvas)
    bounds = [0, *(np.flatnonzero(is_mask[1:] != is_mask[:-1]) + 1).tolist(), len(arr)]
    return "".join(placeholder * (b - a) if is_mask[a] else tokenizer.decode(canvas[a:b])
                   for a, b in zip(bounds, bounds[1:], strict=False))


def stable_prefix(text: str, stop: list[str]) -> str:
    """The part of `text` safe to send: no unfinished UTF-8 character, no tail that may begin a stop string."""
    text = text.rstrip("\ufffd")  # byte-fallback pieces of a character not yet complete
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[:len(text) - hold]


class RequestOutput:
    """Per-request view of the canvas: stop strings, stream rendering, the final cut."""

    def __init__(self, tokenizer: TextTokenizer, mode: StreamMode, stop: list[str], max_tokens: int) -> None:
        self.tok, self.mode, self.stop = tokenizer, mode, stop
        self.mask_id, self.eos_ids = tokenizer.mask_id, tokenizer.eos_ids
        self.max_tokens = max_tokens
        self.prefix_len = 0  # committed left-to-right prefix length at the last step
        self.prefix_text = ""
        self.sent = ""  # text already sent as deltas (mode "prefix")
        self.canvas: list[int] | None = None  # the latest step's canvas
        self.steps = 0  # steps seen

    def on_step(self, ev: SlotStep) -> Update:
        """The client update for one step; a result when the sampler finished it or a stop string did."""
        up = Update()
        self.canvas, self.steps = ev.canvas.tolist(), ev.step + 1
        ev.canvas = self.canvas
        if self.mode == "events":
            committed = [CommittedToken(position=p, id=t, text=self.tok.decode([t])) for p, t in ev.committed.tolist()]
            up.event = StepEvent(step=ev.step, steps=ev.steps, committed=committed, masked=ev.masked,
                                     text=canvas_text(self.tok, ev.canvas, self.mask_id))
        stopped = False
        if (self.stop or self.mode == "prefix") and not ev.done:
            stopped = self._advance_prefix(ev.canvas)
        if ev.done or stopped:
            canvas = ev.canvas if ev.done else ev.canvas[:self.prefix_len]
            tokens, reason, text = finish(canvas, ev.finish_reason or "stop", self.eos_ids, self.stop,
                                          self.tok.decode)
            up.result = Result(tokens, text or "", reason, ev.step + 1, ev.nfe, self.max_tokens - ev.masked)
            if self.mode == "prefix":
                up.delta = self._delta(up.result.text)
        elif self.mode == "prefix":
            up.delta = self._delta(stable_prefix(self.prefix_text, self.stop))
        return up

    def on_timeout(self, nfe: int) -> Update:
        """The result of a request stopped at its deadline: the committed left-to-right prefix so far (cut at
        EOS or a stop string), finish_reason "timeout"."""
        canvas = self.canvas or []
        n = canvas.index(self.mask_id) if self.mask_id in canvas else len(canvas)
        tokens, reason, text = finish(canvas[:n], "timeout", self.eos_ids, self.stop, self.tok.decode)
        committed = self.max_tokens - canvas.count(self.mask_id) if canvas else 0
        up = Update(result=Result(tokens, text or "", reason, self.steps, nfe, committed))
        if self.mode == "prefix":
            up.delta = self._delta(up.result.text)
        return up

    def _advance_prefix(self, canvas: list[int]) -> bool:
        """Track the committed prefix (up to the first mask, cut at EOS); True once it holds a stop string."""
        n = canvas.index(self.mask_id) if self.mask_id in canvas else len(canvas)
        n = next((i for i, t in enumerate(canvas[:n]) if t in self.eos_ids), n)  # cut at the first EOS
        if n == self.prefix_len:
            return False
        self.prefix_len, self.prefix_text = n, self.tok.decode(canvas[:n])
        return any(s in self.prefix_text for s in self.stop)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
