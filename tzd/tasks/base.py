"""What every task offers: its examples by split, its canvas length, and an exact-match scorer."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")
ANSWER_LINE = re.compile(r"^#### (\S+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class TaskExample:
    prompt: str  # what the model is given
    target: str  # the worked solution the model is trained to write; its last line is "#### <answer>"
    answer: str  # the final answer alone


def split_of(problem: str, validation_per_mille: int, test_per_mille: int) -> str:
    """The split a problem belongs to, a pure function of its text: no problem is in two splits."""
    h = int.from_bytes(hashlib.blake2b(problem.encode(), digest_size=8).digest(), "little") % 1000
    if h < test_per_mille:
        return "test"
    return "validation" if h < test_per_mille + validation_per_mille else "train"


class Task(ABC):
    name: str
    max_tokens: int  # the canvas a request for this task is served with (generated tokens)

    @abstractmethod
    def examples(self, split: str, n: int | None = None) -> list[TaskExample]:
        """The split's examples in a fixed order (the first `n`; a split's default size when None)."""

    @staticmethod
    def extract_answer(completion: str) -> str | None:
        """The answer of the first `#### <answer>` line of a completion, or None when there is none."""
        m = ANSWER_LINE.search(completion)
        return m.group(1) if m else None

    def score(self, completion: str, example: TaskExample) -> bool:
        """Exact match of the completion's final answer line with the example's answer."""
        return self.extract_answer(completion) == example.answer

    @staticmethod
    def check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
