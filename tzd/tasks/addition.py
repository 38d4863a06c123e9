"""Multi-digit addition written out column by column, with carries, then the sum on an answer line.

    prompt   "4821+0375\n"                                  (max_digits=4)
    target   "1+5+0=06\n2+7+0=09\n8+3+0=11\n4+0+1=05\n#### 05196"

Operands are written with max_digits digits (leading zeros) and every line has the same width: one
column from the right, the carry coming in (0 or 1), and the two-digit column sum; the answer line reads
the sums' last digits back from the last line to the first, with the final carry in front (max_digits+1
digits). With every field at a fixed place a small model learns the task in minutes of CPU; what stays
hard is the carry chain, which ties each line to the one before: the dependency parallel decoding must
get right. Every token of the target is a function of the prompt, so a model that has learnt the task
is confident almost everywhere, the regime where parallel decoding pays. Operands have 1..max_digits
significant digits, the counts uniform and independent.
"""

from __future__ import annotations

import numpy as np

from tzd.tasks.base import Task, TaskExample, split_of

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 200_000, "validation": 500, "test": 500}


def worked_sum(a: int, b: int, width: int) -> str:
    """The column-by-column solution of a + b over `width` columns, ending with its answer line."""
    da, db = f"{a:0{width}d}"[::-1], f"{b:0{width}d}"[::-1]
    lines, carry, digits = [], 0, []
    for x, y in zip(map(int, da), map(int, db), strict=True):
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s:02d}")
        digits.append(s % 10)
        carry = s // 10
    total = str(carry) + "".join(str(d) for d in reversed(digits))
    assert int(total) == a + b
    return "\n".join(lines) + f"\n#### {total}"


class AdditionTask(Task):
    name = "addition"

    def __init__(self, max_digits: int = 4, max_tokens: int = 64, seed: int = 0,
                 validation_per_mille: int = 10, test_per_mille: int = 10) -> None:
        if not 1 <= max_digits <= 9:
            raise ValueError(f"max_digits={max_digits}: must be in [1, 9]")
        self.max_digits, self.max_tokens, self.seed = max_digits, max_tokens, seed
        self.validation_per_mille, self.test_per_mille = validation_per_mille, test_per_mille

    def example(self, a: int, b: int) -> TaskExample:
        w = self.max_digits
        if not (0 <= a < 10 ** w and 0 <= b < 10 ** w):
            raise ValueError(f"{a}+{b}: operands must have at most max_digits={w} digits")
        target = worked_sum(a, b, w)
        return TaskExample(prompt=f"{a:0{w}d}+{b:0{w}d}\n", target=target, answer=target.rsplit("#### ", 1)[1])

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
                problem = f"{a}+{b}"  # the hash of the unpadded problem: the same split at any width
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
