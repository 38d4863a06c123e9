"""A task's examples as training rows: prompt, worked target, EOS padding, and where the prompt ends.

Each row is laid out as the sampler meets it (LLaDA's SFT recipe): the prompt, then the target, then
EOS to the row's end. Only what follows the prompt is noised (tzd.diffusion.sft_loss); the prompt stays clean.

Training rows vary in length, batch by batch, from the shortest that holds every target and its EOS to
the model's context. A bidirectional model sees where the sequence ends, and one trained on rows of a
single length learns to place the answer relative to that end: addition-small trained on 76-token rows
scored 0.97 with a canvas that made 76 tokens and 0.19 with the task's own 64-token canvas (74 in all).
Validation rows are the sampler's layout exactly: the longest prompt and the task's canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from trainer.data import Corpus, DataError
from tzd.tasks import Task, TaskExample, task_of_data
from tzd.tokenizer import Tokenizer


def load_task(data: DictConfig) -> Task:
    try:
        return task_of_data(data)
    except ValueError as e:
        raise DataError(f"data.task: {e}") from None


def task_corpus(task: Task, data: DictConfig) -> tuple[Corpus, list[TaskExample], list[TaskExample]]:
    """The train/validation examples, and their text as a Corpus (for the tokenizer and the samples)."""
    train = task.examples("train", int(data.train_examples))
    val = task.examples("validation", int(data.val_examples))
    corpus = Corpus([e.prompt + e.target for e in train], [e.prompt for e in val],
                    f"task {task.name}: {len(train):,} train / {len(val):,} validation examples, "
                    f"canvas {task.max_tokens}")
    return corpus, train, val


@dataclass
class TaskRows:
    """Every example of a split encoded once: ids [N, L] and the prompt length of each row."""

    ids: torch.Tensor
    prompt_len: torch.Tensor
    need: torch.Tensor  # the shortest row that holds this example: prompt, target and one EOS

    @property
    def row_len(self) -> int:
        return self.ids.shape[1]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random rows, cut to one random length between the longest `need` among them and
        `row_len` (uniform): the canvas lengths a user may ask for, not one the model could learn."""
        rows = torch.randint(0, len(self.ids), (batch_size,), generator=generator)
        shortest = int(self.need[rows].max())
        length = int(torch.randint(shortest, self.row_len + 1, (1,), generator=generator))
        return self.ids[rows, :length], self.prompt_len[rows]

    def grid(self, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        take = min(len(self.ids), batch_size * max_batches)
        return list(zip(self.ids[:take].split(batch_size), self.prompt_len[:take].split(batch_size), strict=True))


def encode_rows(tokenizer: Tokenizer, examples: list[TaskExample], canvas: int, context: int,
                row_len: int | None = None) -> TaskRows:
    """Encode `examples` into rows of `row_len` tokens (default: the longest prompt + `canvas`); a target
    that does not fit the canvas (with its EOS) or a prompt + canvas past the model's `context` is a
    DataError naming the example, never a silent cut."""
    prompts = tokenizer.encode_batch([e.prompt for e in examples])
    targets = tokenizer.encode_batch([e.target for e in examples])
    longest = max(map(len, prompts), default=0)
    row_len = longest + canvas if row_len is None else row_len
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        if len(t) + 1 > canvas:
            raise DataError(f"data.max_tokens={canvas}: the target of {examples[i].prompt!r} takes {len(t)} "
                            "tokens plus EOS; raise data.max_tokens")
        if len(p) + canvas > min(context, row_len):
            raise DataError(f"model.context_len={context}: prompt {examples[i].prompt!r} ({len(p)} tokens) + "
                            f"canvas {canvas} does not fit; raise model.context_len")
    ids = np.full((len(examples), row_len), tokenizer.eos_id, dtype=np.int64)
    plen = np.array([len(p) for p in prompts], dtype=np.int64)
    need = np.array([len(p) + len(t) + 1 for p, t in zip(prompts, targets, strict=True)], dtype=np.int64)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        ids[i, :len(p) + len(t)] = p + t
    return TaskRows(torch.from_numpy(ids), torch.from_numpy(plen), torch.from_numpy(need))
