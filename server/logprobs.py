"""A result's per-token scores (tzd.sampling.scores) in each API's shape: /generate's own, OpenAI's legacy
completions lists, and chat's content entries. Each token is shown as its own decode."""

from __future__ import annotations

import math

from clients.protocol import (
    VERY_UNLIKELY,
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    TopToken,
)
from tzd.sampling.scores import TokenScore
from tzd.tokenizer import TextTokenizer


def finite(logprob: float) -> float:
    """JSON has no -inf: a probability of 0 shows as OpenAI's VERY_UNLIKELY."""
    return logprob if math.isfinite(logprob) else VERY_UNLIKELY


def of_prob(prob: float | None) -> float | None:
    """A committed token's probability as its log-probability on the wire."""
    return None if prob is None else finite(math.log(prob)) if prob > 0 else VERY_UNLIKELY


def native(tok: TextTokenizer, tokens: list[int], scores: list[TokenScore]) -> list[TokenLogprob]:
    return [TokenLogprob(position=s.position, id=t, token=tok.decode([t]), logprob=finite(s.logprob),
                         top_logprobs=[TopToken(id=i, token=tok.decode([i]), logprob=finite(lp)) for i, lp in s.top])
            for t, s in zip(tokens, scores, strict=True)]


def completion(tok: TextTokenizer, tokens: list[int], scores: list[TokenScore], top: bool) -> CompletionLogprobs:
    texts = [tok.decode([t]) for t in tokens]
    offsets = [0]
    for text in texts[:-1]:
        offsets.append(offsets[-1] + len(text))
    tops = None
    if top:  # OpenAI's shape: a dict per position (a token string decoded twice keeps its best score)
        tops = [{} for _ in scores]
        for d, s in zip(tops, scores, strict=True):
            for i, lp in s.top:
                d.setdefault(tok.decode([i]), finite(lp))
    return CompletionLogprobs(tokens=texts, token_logprobs=[finite(s.logprob) for s in scores], top_logprobs=tops,
                              text_offset=offsets[:len(texts)])


def chat(tok: TextTokenizer, tokens: list[int], scores: list[TokenScore]) -> ChoiceLogprobs:
    def entry(i: int, lp: float) -> TopLogprob:
        text = tok.decode([i])
        return TopLogprob(token=text, logprob=finite(lp), bytes=list(text.encode("utf-8")))

    return ChoiceLogprobs(content=[ChatTokenLogprob(**entry(t, s.logprob).model_dump(),
                                                    top_logprobs=[entry(i, lp) for i, lp in s.top])
                                   for t, s in zip(tokens, scores, strict=True)])
