"""A task's examples as training rows: prompt, worked target, EOS padding, and where the prompt ends.

Each row is laid out as the sampler meets it (LLaDA's SFT recipe): the prompt, then a canvas of the
task's `max_tokens` holding the target and EOS up to its end, then EOS padding to the longest prompt
of the split. Only the canvas and the padding are noised (tzd.diffusion.sft_loss); the prompt stays clean.
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

    @property
    def row_len(self) -> int:
        return self.ids.shape[1]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, len(self.ids), (batch_size,), generator=generator)
        return self.ids[rows], self.prompt_len[rows]

    def grid(self, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        take = min(len(self.ids), batch_size * max_batches)
        return list(zip(self.ids[:take].split(batch_size), self.prompt_len[:take].split(batch_size), strict=True))


def encode_rows(tokenizer: Tokenizer, examples: list[TaskExample], canvas: int, row_len: int) -> TaskRows:
    """Encode `examples` into rows of `row_len` tokens; a target that does not fit the canvas (with its
    EOS) or a row past `row_len` is a DataError naming the example, never a silent cut."""
    prompts = tokenizer.encode_batch([e.prompt for e in examples])
    targets = tokenizer.encode_batch([e.target for e in examples])
    ids = np.full((len(examples), row_len), tokenizer.eos_id, dtype=np.int64)
    plen = np.zeros(len(examples), dtype=np.int64)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        if len(t) + 1 > canvas:
            raise DataError(f"data.max_tokens={canvas}: the target of {examples[i].prompt!r} takes {len(t)} "
                            "tokens plus EOS; raise data.max_tokens")
        if len(p) + canvas > row_len:
            raise DataError(f"model.block_size={row_len}: prompt {examples[i].prompt!r} ({len(p)} tokens) + "
                            f"canvas {canvas} does not fit; raise model.block_size")
        ids[i, :len(p)] = p
        ids[i, len(p):len(p) + len(t)] = t
        plen[i] = len(p)
    return TaskRows(torch.from_numpy(ids), torch.from_numpy(plen))
