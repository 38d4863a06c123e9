"""Turn the sampler's step events into what a client sees: step data, text deltas, the final result.

Runs on the engine's output thread beside the next step (server.engine), so neither the step nor the
event loop waits for it. Work here is per request and per run of tokens; text is decoded incrementally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from clients.protocol import MASK_PLACEHOLDER, CommittedToken, StepEvent
from server.detokenize import CanvasText, PrefixText, decode_canvas
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
    nfe_saved: int = 0  # forwards an early exit saved (SlotStep.nfe_saved)


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


def canvas_text(tokenizer: TextTokenizer, canvas: Sequence[int] | np.ndarray, mask_id: int,
                placeholder: str = MASK_PLACEHOLDER) -> str:
    """The partly denoised canvas as text, one placeholder per masked position (decoded run by run)."""
    return decode_canvas(tokenizer.decode, canvas, mask_id, placeholder)


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
    """Per-request view of the canvas: stop strings, stream rendering, the final cut. Its text is kept
    incrementally (server.detokenize): a step decodes the tokens it committed, not the canvas again."""

    def __init__(self, tokenizer: TextTokenizer, mode: StreamMode, stop: list[str], max_tokens: int) -> None:
        self.tok, self.mode, self.stop = tokenizer, mode, stop
        self.mask_id, self.eos_ids = tokenizer.mask_id, tokenizer.eos_ids
        self._eos = np.array(self.eos_ids, dtype=np.int64)
        self.max_tokens = max_tokens
        self.prefix_len = 0  # committed left-to-right prefix length at the last step
        self._prefix = PrefixText(tokenizer.decode)
        self._canvas_text = CanvasText(tokenizer.decode, self.mask_id)
        self._hold = max((len(s) for s in stop), default=0)  # a stop string ends in the text's last chars
        self.sent = ""  # text already sent as deltas (mode "prefix")
        self.canvas: np.ndarray | None = None  # the latest step's canvas
        self.steps = 0  # steps seen
        self.nfe = 0  # forward passes as of the latest step
        self.finished = False  # a result was made: later steps (already run) are not rendered

    @property
    def prefix_text(self) -> str:
        return self._prefix.text

    def on_step(self, ev: SlotStep) -> Update:
        """The client update for one step; a result when the sampler finished it or a stop string did."""
        up = Update()
        self.canvas, self.steps, self.nfe = ev.canvas, ev.step + 1, ev.nfe
        if self.mode == "events":
            committed = [CommittedToken(position=p, id=t, text=self.tok.decode([t]))
                         for p, t in zip(ev.positions.tolist(), ev.tokens.tolist(), strict=True)]
            up.event = StepEvent(step=ev.step, steps=ev.steps, committed=committed, masked=ev.masked,
                                 text=self._canvas_text.update(ev.canvas))
        stopped = False
        if (self.stop or self.mode == "prefix") and not ev.done:
            stopped = self._advance_prefix(ev.canvas)
        if ev.done or stopped:
            self.finished = True
            canvas = ev.canvas if ev.done else ev.canvas[:self.prefix_len]
            tokens, reason, text = finish(canvas, ev.finish_reason or "stop", self.eos_ids, self.stop,
                                          self.tok.decode)
            committed = self.max_tokens - ev.masked - ev.filled  # an early exit's EOS fill is not committed
            up.result = Result(tokens, text or "", reason, ev.step + 1, ev.nfe, committed, ev.nfe_saved)
            if self.mode == "prefix":
                up.delta = self._delta(up.result.text)
        elif self.mode == "prefix":
            up.delta = self._delta(stable_prefix(self.prefix_text, self.stop))
        return up

    def on_timeout(self, nfe: int) -> Update:
        """The result of a request stopped at its deadline: the committed left-to-right prefix so far (cut at
        EOS or a stop string), finish_reason "timeout"."""
        self.finished = True
        canvas = self.canvas if self.canvas is not None else np.zeros(0, dtype=np.int64)
        tokens, reason, text = finish(canvas[:self._first_mask(canvas)], "timeout", self.eos_ids, self.stop,
                                      self.tok.decode)
        committed = self.max_tokens - int((canvas == self.mask_id).sum()) if len(canvas) else 0
        up = Update(result=Result(tokens, text or "", reason, self.steps, nfe, committed))
        if self.mode == "prefix":
            up.delta = self._delta(up.result.text)
        return up

    def _first_mask(self, canvas: np.ndarray) -> int:
        is_mask = canvas == self.mask_id
        return int(is_mask.argmax()) if is_mask.any() else len(canvas)

    def _advance_prefix(self, canvas: np.ndarray) -> bool:
        """Track the committed prefix (up to the first mask, cut at EOS); True once it holds a stop string."""
        n = self._first_mask(canvas)
        if len(self._eos):
            is_eos = np.isin(canvas[:n], self._eos)
            if is_eos.any():  # cut at the first EOS
                n = int(is_eos.argmax())
        if n == self.prefix_len:
            return False
        before = len(self.prefix_text)
        self.prefix_len = n
        text = self._prefix.update(canvas, n)
        tail = text[max(0, before - self._hold):]  # only the new text can complete a stop string
        return any(s in tail for s in self.stop)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
