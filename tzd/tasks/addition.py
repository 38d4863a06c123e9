"""Multi-digit addition written out column by column, with carries, then the sum on an answer line.

    prompt   "4821+375\n"
    target   "1+5=6\n2+7=9\n8+3=11\n4+0+1=5\n#### 5196"

Each line adds one column from the right (a missing digit is 0) plus the carry of the line before (the
"+1" appears only when that line's sum reached 10); the answer line reads the sums' last digits back
from the last line to the first, with the final carry in front. Every token of the target is a function
of the prompt, so a model that has learnt the task is confident everywhere: the regime where parallel
decoding pays. Operands have 1..max_digits digits, the digit counts uniform and independent.
"""

from __future__ import annotations

import numpy as np

from tzd.tasks.base import Task, TaskExample, split_of

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 200_000, "validation": 500, "test": 500}


def worked_sum(a: int, b: int) -> str:
    """The column-by-column solution of a + b, ending with its answer line."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry, digits = [], 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        digits.append(s % 10)
        carry = s // 10
    total = ("1" if carry else "") + "".join(str(d) for d in reversed(digits))
    assert int(total) == a + b
    return "\n".join(lines) + f"\n#### {total}"


class AdditionTask(Task):
    name = "addition"

    def __init__(self, max_digits: int = 5, max_tokens: int = 96, seed: int = 0,
                 validation_per_mille: int = 10, test_per_mille: int = 10) -> None:
        if not 1 <= max_digits <= 9:
            raise ValueError(f"max_digits={max_digits}: must be in [1, 9]")
        self.max_digits, self.max_tokens, self.seed = max_digits, max_tokens, seed
        self.validation_per_mille, self.test_per_mille = validation_per_mille, test_per_mille

    def example(self, a: int, b: int) -> TaskExample:
        target = worked_sum(a, b)
        return TaskExample(prompt=f"{a}+{b}\n", target=target, answer=target.rsplit("#### ", 1)[1])

    def examples(self, split: str, n: int | None = None) -> list[TaskExample]:
        """Draws operand pairs from a generator seeded by (task seed, split) and keeps those whose hash
        puts them in `split`, until `n` distinct problems are found (in draw order)."""
        self.check_split(split)
        n = DEFAULT_SIZES[split] if n is None else n
        rng = np.random.default_rng([self.seed, SPLIT_SEEDS[split], self.max_digits])
        out: list[TaskExample] = []
        seen: set[str] = set()
        while len(out) < n:
            for a, b in self._draw(rng, max(1024, 2 * (n - len(out)))):
                problem = f"{a}+{b}"
                if problem in seen or split_of(problem, self.validation_per_mille, self.test_per_mille) != split:
                    continue
                seen.add(problem)
                out.append(self.example(a, b))
                if len(out) == n:
                    break
        return out

    def _draw(self, rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
        digits = rng.integers(1, self.max_digits + 1, size=(count, 2))
        lo = np.where(digits == 1, 0, 10 ** (digits - 1))
        values = rng.integers(lo, 10 ** digits)
        return [(int(a), int(b)) for a, b in values]
