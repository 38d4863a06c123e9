"""generate(): denoise a list of prompts to completion, admitting them into one DenoiseBatch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from clients.protocol import SamplingParams
from tzd.models import model_config
from tzd.sampling.batch import SlotStep, eos_set
from tzd.sampling.config import EngineConfig
from tzd.sampling.core import EngineCore
from tzd.sampling.infill import Layout
from tzd.sampling.params import plan
from tzd.sampling.scheduler import CoreRequest
from tzd.sampling.scores import TokenScore, TokenScores


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids only, cut before EOS or a stop string
    steps: int  # denoising steps taken
    nfe: int  # forward passes (two per step with classifier-free guidance)
    finish_reason: str  # "length" | "stop"
    seed: int
    text: str | None = None  # with a tokenizer
    # forwards an early exit saved (params.early_exit, with eos_id given): the step budgets of the plan's
    # remaining blocks, so nfe + nfe_saved is the whole canvas's nfe for the fixed schedule and an upper
    # bound of it with threshold or entropy_bound (whose blocks may end before their budget); 0 otherwise
    nfe_saved: int = 0
    logprobs: list[TokenScore] | None = None  # each token's log-probability (and alternatives) at its commit
    gaps: list[list[int]] | None = None  # an infill's (layouts): each gap's tokens, EOS padding removed
    gap_texts: list[str] | None = None  # with a tokenizer: their texts


def finish(canvas: Sequence[int] | np.ndarray, finish_reason: str, eos_id: int | Sequence[int] | None,
           stop: Sequence[str], decode: Callable[[list[int]], str] | None) -> tuple[list[int], str, str | None]:
    """Cut a finished canvas at the first EOS (of the eos set), then at the first stop string (text and tokens)."""
    tokens = canvas.tolist() if isinstance(canvas, np.ndarray) else list(canvas)
    eos = set(eos_set(eos_id))
    first = next((i for i, t in enumerate(tokens) if t in eos), None) if eos else None
    if first is not None:
        tokens, finish_reason = tokens[:first], "stop"
    if decode is None:
        return tokens, finish_reason, None
    text = decode(tokens)
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        text, finish_reason = text[:min(cuts)], "stop"
        n = 0
        while n < len(tokens) and not decode(tokens[:n]).startswith(text):
            n += 1
        tokens = tokens[:n]
    return tokens, finish_reason, text


@dataclass
class Fill:
    """A finished canvas read out: the tokens kept (an infill's gaps' in order), their canvas positions,
    and each gap's tokens and text (an infill's: one entry per gap; a plain request's: None)."""

    tokens: list[int]
    positions: list[int]
    finish_reason: str
    text: str | None
    gaps: list[list[int]] | None = None
    gap_texts: list[str] | None = None


def finish_canvas(canvas: np.ndarray, finish_reason: str, eos_id: int | Sequence[int] | None, stop: Sequence[str],
                  decode: Callable[[list[int]], str] | None, layout: Layout | None = None,
                  mask_id: int | None = None) -> Fill:
    """`finish` for any request. An infill's gaps lose their EOS padding (and, when it ended early, their
    masks: `mask_id`), then each is cut at its first stop string; its finish_reason is "stop" when a gap
    held EOS or a stop string, else the given one. Its text is the gaps' texts joined."""
    if layout is None:
        tokens, reason, text = finish(canvas, finish_reason, eos_id, stop, decode)
        return Fill(tokens, list(range(len(tokens))), reason, text)
    canvas = np.asarray(canvas)
    eos = np.array(eos_set(eos_id), dtype=np.int64)
    fill = Fill([], [], finish_reason, None, [], [] if decode is not None else None)
    for off, n in layout.gaps():
        ids = canvas[off:off + n]
        keep = ~np.isin(ids, eos) & (ids != (mask_id if mask_id is not None else -1))
        tokens, reason, text = finish(ids[keep], "length", None, stop, decode)
        if finish_reason != "timeout" and (reason == "stop" or np.isin(ids, eos).any()):
            fill.finish_reason = "stop"
        fill.tokens += tokens
        fill.positions += (off + np.flatnonzero(keep)[:len(tokens)]).tolist()
        fill.gaps.append(tokens)  # type: ignore[union-attr]
        if fill.gap_texts is not None:
            fill.gap_texts.append(text or "")
    if fill.gap_texts is not None:
        fill.text = "".join(fill.gap_texts)
    return fill


def generate(model: nn.Module, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             mask_id: int, on_step: Callable[[int, SlotStep], None] | None = None,
             eos_id: int | Sequence[int] | None = None,
             tokenizer=None, max_batch: int | None = None,
             kv_cache_bytes: int | None = None,
             layouts: Sequence[Layout | None] | None = None) -> list[GenerationResult]:
    """Generate for every prompt; `on_step(i, event)` sees each step of prompt i.

    Prompts are admitted as the server admits requests (EngineCore: by `priority`, then in order) as slots
    and KV pages free up (at most `max_batch` at once, default all; `kv_cache_bytes` of KV pages, default
    enough for every slot); a prompt larger than the whole KV cache raises ValueError. With a `tokenizer`, stop strings
    are applied and results carry text. With `eos_id`, results are cut at the first EOS, and a request
    with `early_exit` (the default) stops denoising once that EOS is in its committed left part.
    `layouts[i]`: prompt i is an infill's (tzd.sampling.infill): its result's tokens are its gaps' fills.
    """
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"params: {len(plist)} given for {len(prompts)} prompts")
    lays = list(layouts) if layouts is not None else [None] * len(prompts)
    if len(lays) != len(prompts):
        raise ValueError(f"layouts: {len(lays)} given for {len(prompts)} prompts")
    cfg = model_config(model)
    plans = [plan(p, len(pr), cfg.context_len, cfg.denoise_block, cfg.block_align == "absolute", lay, cfg.decode_rule)
             for p, pr, lay in zip(plist, prompts, lays, strict=True)]
    config = EngineConfig(max_batch_size=min(max_batch or len(prompts), len(prompts)) or 1,
                          kv_cache_bytes=kv_cache_bytes)
    core = EngineCore.create(model, mask_id, config, eos_id)  # the server's admission rule and step
    batch = core.batch
    for p in plans:
        batch.check_fits(p)  # one that could never start raises now, not wait for pages forever
    core.submit([CoreRequest(prompts[i], plans[i], priority=plist[i].priority, handle=i)
                 for i in range(len(prompts))])
    results: list[GenerationResult | None] = [None] * len(prompts)
    decode = tokenizer.decode if tokenizer is not None else None
    scores = [TokenScores(p.visible, p.params.top_logprobs) for p in plans]
    while core.has_work():
        out = core.step()
        if out.not_started:  # a request the batch can never hold (larger than the whole KV cache)
            raise out.not_started[0][1]
        if out.error is not None:
            raise out.error
        for ev in out.events:
            i = ev.handle.handle
            if on_step is not None:
                on_step(i, ev)
            scores[i].add(ev)
            if ev.done:
                p = plans[i]
                f = finish_canvas(ev.canvas, ev.finish_reason, eos_id, p.params.stop, decode, p.layout)
                results[i] = GenerationResult(f.tokens, ev.step + 1, ev.nfe, f.finish_reason, p.seed, f.text,
                                              ev.nfe_saved, scores[i].at(f.positions), f.gaps, f.gap_texts)
    return results  # type: ignore[return-value]
