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
from server.logprobs import of_prob
from tzd.sampling import Layout, SlotStep, finish_canvas
from tzd.sampling.scores import TokenScore, TokenScores
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
    gaps: list[str] | None = None  # an infill's: each gap's text (the text is them joined)
    scores: list[TokenScore] | None = None  # one per token, where the request asked for logprobs


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

    def __init__(self, tokenizer: TextTokenizer, mode: StreamMode, stop: list[str], max_tokens: int,
                 layout: Layout | None = None, logprobs: bool = False, top_logprobs: int = 0) -> None:
        self.tok, self.mode, self.stop = tokenizer, mode, stop
        self.layout = layout  # an infill's canvas and suffix: EOS in a gap is padding, removed
        self.fillable = layout.masked if layout is not None else max_tokens  # positions the model writes
        self.scores = TokenScores(max_tokens, top_logprobs) if logprobs else None
        # the committed left-to-right text is the output's: a plain canvas, or one gap before a suffix (an
        # infill of several gaps applies its stop strings to each gap at the end)
        self._one_gap = layout is None or len(layout.gaps()) == 1
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
        if self.scores is not None:
            self.scores.add(ev)
        if self.mode == "events":
            probs = ev.probs.tolist() if ev.probs is not None else [None] * len(ev.positions)
            committed = [CommittedToken(position=p, id=t, text=self.tok.decode([t]), logprob=of_prob(q))
                         for p, t, q in zip(ev.positions.tolist(), ev.tokens.tolist(), probs, strict=True)]
            up.event = StepEvent(step=ev.step, steps=ev.steps, committed=committed, masked=ev.masked,
                                 text=self._canvas_text.update(ev.canvas))
        stopped = False
        if (self.stop or self.mode == "prefix") and not ev.done and self._one_gap:
            stopped = self._advance_prefix(ev.canvas)
        if ev.done or stopped:
            self.finished = True
            canvas = ev.canvas if ev.done or self.layout is not None else ev.canvas[:self.prefix_len]
            committed = self.fillable - ev.masked - ev.filled  # an early exit's EOS fill is not committed
            up.result = self._result(canvas, ev.finish_reason or "stop", ev.step + 1, ev.nfe, committed,
                                     ev.nfe_saved)
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
        committed = self.fillable - int((canvas == self.mask_id).sum()) if len(canvas) else 0
        if self.layout is None:  # the committed left-to-right prefix; an infill's gaps keep what they have
            canvas = canvas[:self._first_mask(canvas)]
        if self.layout is not None and not len(canvas):
            canvas = self.layout.canvas(self.mask_id)
        up = Update(result=self._result(canvas, "timeout", self.steps, nfe, committed))
        if self.mode == "prefix":
            up.delta = self._delta(up.result.text)
        return up

    def _result(self, canvas: np.ndarray, reason: str, steps: int, nfe: int, committed: int,
                nfe_saved: int = 0) -> Result:
        """The result of a finished canvas: cut at EOS and stop (an infill: its gaps' fills), with scores."""
        f = finish_canvas(canvas, reason, self.eos_ids, self.stop, self.tok.decode, self.layout, self.mask_id)
        scores = self.scores.at(f.positions) if self.scores is not None else None
        return Result(f.tokens, f.text or "", f.finish_reason, steps, nfe, committed, nfe_saved, f.gap_texts, scores)

    def _first_mask(self, canvas: np.ndarray) -> int:
        is_mask = canvas == self.mask_id
        return int(is_mask.argmax()) if is_mask.any() else len(canvas)

    def _advance_prefix(self, canvas: np.ndarray) -> bool:
        """Track the committed prefix (up to the first mask, cut at EOS); True once it holds a stop string."""
        n = self._first_mask(canvas)
        ids = canvas
        if self.layout is not None:  # an infill's gap (the first): its EOS is padding, dropped
            ids = canvas[:n][~np.isin(canvas[:n], self._eos)]
            n = len(ids)
        elif len(self._eos):
            is_eos = np.isin(canvas[:n], self._eos)
            if is_eos.any():  # cut at the first EOS
                n = int(is_eos.argmax())
        if n == self.prefix_len:
            return False
        before = len(self.prefix_text)
        self.prefix_len = n
        text = self._prefix.update(ids, n)
        tail = text[max(0, before - self._hold):]  # only the new text can complete a stop string
        return any(s in tail for s in self.stop)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
