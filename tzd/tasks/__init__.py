"""Tasks with an exact answer: generated offline and deterministically, scored by exact match.

A task gives train/validation/test examples (disjoint by construction: every problem belongs to one
split by a hash of its text), the canvas length it is served with, and its scorer. The trainer trains
on it (`data=task`, `experiment=addition-small`), `bench.accuracy` and the lm-eval task YAML score it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tzd.tasks.addition import AdditionTask
from tzd.tasks.base import SPLITS, Task, TaskExample

TASKS: dict[str, type[Task]] = {"addition": AdditionTask}

__all__ = ["SPLITS", "TASKS", "Task", "TaskExample", "get_task", "task_of_checkpoint", "task_of_data"]

TASK_OPTIONS = ("max_digits", "max_tokens", "seed")  # the generator knobs a data=task config may set


def get_task(name: str, **options: int) -> Task:
    """The task called `name`; `options` are its generator's knobs (e.g. max_digits for addition)."""
    if name not in TASKS:
        raise ValueError(f"task {name!r}: unknown; known tasks: {sorted(TASKS)}")
    return TASKS[name](**options)


def task_of_checkpoint(config: dict) -> Task | None:
    """The task a checkpoint was trained on (its config.json's training.config.data, data=task), with the
    same generator options, so its test split is the one it never saw; None for a text model."""
    data = config.get("training", {}).get("config", {}).get("data", {})
    return task_of_data(data) if data.get("name") == "task" else None


def task_of_data(data: Mapping[str, Any]) -> Task:
    """The task a data=task config names (`data.task`), with its generator options."""
    return get_task(str(data["task"]), **{k: int(data[k]) for k in TASK_OPTIONS if data.get(k) is not None})
