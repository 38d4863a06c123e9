"""Run a task's examples through the real sampler and score them: accuracy, forwards, tokens, time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch.nn as nn

from tzd.sampling import SamplingParams, generate
from tzd.sampling.params import DEFAULT_BLOCK_LENGTH
from tzd.tasks.base import Task, TaskExample
from tzd.tokenizer import TextTokenizer


@dataclass
class TaskScore:
    accuracy: float
    examples: int
    correct: int
    nfe: int  # forward passes over all examples
    canvas_tokens: int  # generated positions (max_tokens per example, EOS padding included)
    answer_tokens: int  # generated tokens before the first EOS
    seconds: float
    completions: list[str]

    @property
    def nfe_per_token(self) -> float:
        return self.nfe / max(1, self.canvas_tokens)


def score_task(model: nn.Module, tokenizer: TextTokenizer, task: Task, examples: list[TaskExample],
               params: SamplingParams, batch_size: int = 16, stop_at_eos: bool = True) -> TaskScore:
    """Generate for every example (at most `batch_size` at once: the batch shape a server runs) and score
    each completion by the task's exact match.

    `stop_at_eos`: a row ends once its committed left part holds an EOS, as the server's rows do (the
    tokens are the same: what is right of that EOS is cut anyway); False denoises the whole canvas, as
    LLaDA's reference loop does, the completion then cut at its first EOS for scoring."""
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    t0 = time.perf_counter()
    results = generate(model, prompts, params, mask_id=tokenizer.mask_id,
                       eos_id=tokenizer.eos_ids if stop_at_eos else None, tokenizer=tokenizer, max_batch=batch_size)
    seconds = time.perf_counter() - t0
    if not stop_at_eos:  # cut as a served request is cut (tzd.sampling.generate.finish)
        eos = set(tokenizer.eos_ids)
        for r in results:
            r.tokens = r.tokens[:next((i for i, t in enumerate(r.tokens) if t in eos), len(r.tokens))]
            r.text = tokenizer.decode(r.tokens)
    texts = [r.text or "" for r in results]
    correct = sum(task.score(t, e) for t, e in zip(texts, examples, strict=True))
    return TaskScore(accuracy=correct / max(1, len(examples)), examples=len(examples), correct=correct,
                     nfe=sum(r.nfe for r in results), canvas_tokens=params.max_tokens * len(examples),
                     answer_tokens=sum(len(r.tokens) for r in results), seconds=seconds, completions=texts)


def baseline_params(task: Task, block_length: int = DEFAULT_BLOCK_LENGTH,
                    model_block: int | None = None) -> SamplingParams:
    """LLaDA's baseline sampler on the task's canvas: one token per step, low confidence, greedy; a
    block-causal model's block replaces `block_length`."""
    n = task.max_tokens
    return SamplingParams(max_tokens=n, steps=n, block_length=min(model_block or block_length, n), temperature=0.0)
