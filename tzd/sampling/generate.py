"""generate(): denoise a list of prompts to completion, admitting them into one DenoiseBatch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from tzd.models import model_config
from tzd.sampling.batch import DenoiseBatch, SlotStep, eos_set
from tzd.sampling.params import SamplingParams, plan


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


def finish(canvas: Sequence[int] | np.ndarray, finish_reason: str, eos_id: int | Sequence[int] | None, stop: Sequence[str],
           decode: Callable[[list[int]], str] | None) -> tuple[list[int], str, str | None]:
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


def generate(model: nn.Module, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             mask_id: int, on_step: Callable[[int, SlotStep], None] | None = None,
             eos_id: int | Sequence[int] | None = None,
             tokenizer=None, max_batch: int | None = None,
             kv_cache_bytes: int | None = None) -> list[GenerationResult]:
    """Generate for every prompt; `on_step(i, event)` sees each step of prompt i.

    Prompts are admitted in order as slots and KV pages free up (at most `max_batch` at once, default
    all; `kv_cache_bytes` of KV pages, default enough for every slot). With a `tokenizer`, stop strings
    are applied and results carry text. With `eos_id`, results are cut at the first EOS, and a request
    with `early_exit` (the default) stops denoising once that EOS is in its committed left part.
    """
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"params: {len(plist)} given for {len(prompts)} prompts")
    cfg = model_config(model)
    plans = [plan(p, len(pr), cfg.block_size, cfg.denoise_block, cfg.block_align == "absolute")
             for p, pr in zip(plist, prompts, strict=True)]
    batch = DenoiseBatch(model, mask_id, capacity=min(max_batch or len(prompts), len(prompts)) or 1,
                         eos_id=eos_id, kv_cache_bytes=kv_cache_bytes)
    results: list[GenerationResult | None] = [None] * len(prompts)
    waiting = list(range(len(prompts)))
    decode = tokenizer.decode if tokenizer is not None else None
    while waiting or len(batch):
        while waiting and batch.fits(plans[waiting[0]]):
            i = waiting.pop(0)
            batch.add(prompts[i], plans[i], handle=i)
        for ev in batch.step():
            if on_step is not None:
                on_step(ev.handle, ev)
            if ev.done:
                tokens, reason, text = finish(ev.canvas, ev.finish_reason, eos_id, plans[ev.handle].params.stop,
                                              decode)
                results[ev.handle] = GenerationResult(tokens, ev.step + 1, ev.nfe, reason, plans[ev.handle].seed,
                                                      text, ev.nfe_saved)
    return results  # type: ignore[return-value]
