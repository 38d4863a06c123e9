"""The samples a run writes as it trains: prompts cut from the validation text, sized to the model's context."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tzd.sampling import SamplingParams, generate
from tzd.tokenizer import Tokenizer

MIN_PROMPT_TOKENS = 8  # a long prompt is cut down to this many tokens (its end) before the sample shrinks
MIN_SAMPLE_TOKENS = 16  # and the sample never shrinks below this (or below training.sample_tokens when smaller)
TEMPERATURES = (0.5, 1.0)


class NoRoomForSamples(ValueError):
    """The model's context cannot hold a shortest prompt plus the shortest sample."""


@dataclass(frozen=True)
class SamplePlan:
    prompts: list[str]  # the text of each prompt as the model gets it
    prompt_ids: list[list[int]]
    max_tokens: int
    note: str | None = None  # what had to give way to fit the context, for the run's log


def sample_prompts(val_docs: list[str]) -> list[str]:
    """Two prompts: text from the middle of the first two validation documents, from a paragraph start."""
    return [d[len(d) // 2:][:200].split("\n\n", 1)[-1][:80] for d in val_docs[:2]]


def fit_samples(prompt_ids: list[list[int]], sample_tokens: int, context: int) -> tuple[list[list[int]], int]:
    """Prompts and max_tokens with prompt + max_tokens <= context for every prompt.

    Prompts give way first: each keeps its last tokens, down to MIN_PROMPT_TOKENS; then max_tokens is
    capped, down to MIN_SAMPLE_TOKENS. Below both floors there is no sample: NoRoomForSamples.
    """
    floor = min(MIN_SAMPLE_TOKENS, sample_tokens)
    prompt_room = max(context - sample_tokens, 0)
    cut = []
    for ids in prompt_ids:
        keep = min(len(ids), max(prompt_room, MIN_PROMPT_TOKENS))
        cut.append(ids[len(ids) - keep:])
    longest = max((len(ids) for ids in cut), default=0)
    max_tokens = min(sample_tokens, context - longest)
    if max_tokens < floor:
        raise NoRoomForSamples(f"model.context_len={context} cannot hold a prompt of {longest} tokens plus "
                               f"{floor} generated ones (training.sample_tokens={sample_tokens})")
    return cut, max_tokens


def plan_samples(texts: list[str], tokenizer: Tokenizer, sample_tokens: int, context: int) -> SamplePlan:
    ids = [tokenizer.encode(text) for text in texts]
    cut, max_tokens = fit_samples(ids, sample_tokens, context)
    prompts = [text if len(c) == len(i) else tokenizer.decode(c) for text, i, c in zip(texts, ids, cut, strict=True)]
    changes = []
    if any(len(c) < len(i) for i, c in zip(ids, cut, strict=True)):
        changes.append(f"prompts cut to their last {max(len(c) for c in cut)} tokens")
    if max_tokens < sample_tokens:
        changes.append(f"max_tokens {max_tokens} instead of training.sample_tokens={sample_tokens}")
    note = f"samples: {' and '.join(changes)} to fit model.context_len={context}" if changes else None
    return SamplePlan(prompts, cut, max_tokens, note)


def generate_samples(model: torch.nn.Module, tokenizer: Tokenizer, plan: SamplePlan, step: int) -> list[dict[str, Any]]:
    """One sample per prompt and temperature through the real sampler, seeded by the step."""
    n = plan.max_tokens
    rows = []
    for temperature in TEMPERATURES:
        # block_length left to the sampler's own default (clients.protocol.DEFAULT_BLOCK_LENGTH, or a block-causal
        # model's own block, the only one it can denoise: tzd.sampling.params.plan)
        params = SamplingParams(max_tokens=n, steps=n, temperature=temperature, seed=step)
        results = generate(model, plan.prompt_ids, params, mask_id=tokenizer.mask_id)
        for prompt, res in zip(plan.prompts, results, strict=True):
            rows.append({"step": step, "temperature": temperature, "prompt": prompt, "max_tokens": n,
                         "text": tokenizer.decode(res.tokens)})
    return rows


def append_samples(rows: list[dict[str, Any]], out_dir: Path) -> None:
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "logs" / "samples.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_samples(model: torch.nn.Module, tokenizer: Tokenizer, plan: SamplePlan, step: int,
                  out_dir: Path) -> list[dict[str, Any]]:
    """Samples at each temperature, appended to out_dir/logs/samples.jsonl."""
    rows = generate_samples(model, tokenizer, plan, step)
    append_samples(rows, out_dir)
    return rows
