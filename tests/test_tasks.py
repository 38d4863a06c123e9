"""The shipped task (tzd/tasks): deterministic, disjoint splits; worked solutions that are right; the scorer."""

from __future__ import annotations

import random

import pytest

from tzd.tasks import get_task
from tzd.tasks.addition import worked_sum


def test_splits_are_deterministic_and_disjoint() -> None:
    task = get_task("addition", max_digits=4)
    splits = {s: task.examples(s, 3000 if s == "train" else 300) for s in ("train", "validation", "test")}
    assert task.examples("test", 300) == splits["test"]  # the same problems in the same order every time
    problems = {s: {e.prompt for e in ex} for s, ex in splits.items()}
    assert all(len(problems[s]) == len(splits[s]) for s in splits)  # no repeats within a split
    assert not problems["train"] & problems["test"] and not problems["train"] & problems["validation"]
    assert not problems["validation"] & problems["test"]
    other_seed = get_task("addition", max_digits=4, seed=1).examples("test", 300)
    assert {e.prompt for e in other_seed} != problems["test"]
    assert get_task("addition", max_digits=4, seed=1).examples("test", 300) == other_seed


def test_worked_sums_are_correct_and_fit_the_canvas() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.randrange(10_000), rng.randrange(10_000)
        text = worked_sum(a, b, 4)
        assert int(text.rsplit("#### ", 1)[1]) == a + b and len(text.rsplit("#### ", 1)[1]) == 5
        lines = text.splitlines()[:-1]
        assert len(lines) == 4 and all(len(line) == 8 for line in lines)
    assert worked_sum(95, 7, 3) == "5+7+0=12\n9+0+1=10\n0+0+1=01\n#### 0102"
    ex = get_task("addition", max_digits=3).example(95, 7)
    assert ex.prompt == "095+007\n" and ex.answer == "0102"
    with pytest.raises(ValueError, match="max_digits=3"):
        get_task("addition", max_digits=3).example(1000, 1)
    task = get_task("addition", max_digits=4)
    assert max(len(e.target) for e in task.examples("train", 5000)) < task.max_tokens


def test_scorer_takes_the_answer_line_only() -> None:
    task = get_task("addition", max_digits=2)
    ex = task.example(95, 7)
    assert task.score(ex.target, ex) and ex.answer == "102"
    assert task.score("junk\n#### 102\nmore", ex)
    assert not task.score("5+7+0=12\n#### 103", ex)
    assert not task.score("102", ex)  # no answer line: wrong, whatever the digits
    assert task.extract_answer("#### 102 ") == "102"


def test_unknown_task_and_split_are_named() -> None:
    with pytest.raises(ValueError, match="task 'sudoku'"):
        get_task("sudoku")
    with pytest.raises(ValueError, match="split 'dev'"):
        get_task("addition").examples("dev")
    with pytest.raises(ValueError, match="max_digits=0"):
        get_task("addition", max_digits=0)
