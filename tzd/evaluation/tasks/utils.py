"""The hooks of tzd_addition.yaml: docs from tzd.tasks (generated, not downloaded) and its exact-match scorer."""

from __future__ import annotations

from typing import Any

import datasets

from tzd.tasks import TaskExample, get_task

TASK_NAME = "addition"
DEFAULTS = {"max_digits": 4, "max_tokens": 64}  # models/addition-small's (trainer/conf/experiment/addition-small.yaml)
# (the canvas, max_tokens, does not change the docs: the YAML's max_gen_toks carries it)
VALIDATION_EXAMPLES = 64  # few-shot examples come from here


def load_splits(max_digits: int = DEFAULTS["max_digits"], test_examples: int | None = None,
                **_metadata: Any) -> dict[str, datasets.Dataset]:
    """lm-eval's custom_dataset hook: the task's validation and test splits as datasets. lm-eval calls it with
    the task's metadata merged with --metadata and the model_args (pretrained, max_tokens, ...): those other
    keys are not the task's and are ignored."""
    task = get_task(TASK_NAME, max_digits=int(max_digits), max_tokens=DEFAULTS["max_tokens"])
    test = task.examples("test", None if test_examples is None else int(test_examples))
    return {"validation": to_dataset(task.examples("validation", VALIDATION_EXAMPLES)), "test": to_dataset(test)}


def to_dataset(examples: list[TaskExample]) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": e.prompt, "target": e.target, "answer": e.answer}
                                       for e in examples])


def doc_to_text(doc: dict[str, str]) -> str:
    return doc["prompt"]  # exactly the prompt the model was trained on (its trailing newline included)


def doc_to_target(doc: dict[str, str]) -> str:
    return doc["target"]


def process_results(doc: dict[str, str], results: list[str]) -> dict[str, float]:
    """exact_match: the task's own scorer (the final answer line of the completion against the answer)."""
    example = TaskExample(prompt=doc["prompt"], target=doc["target"], answer=doc["answer"])
    return {"exact_match": float(get_task(TASK_NAME, **DEFAULTS).score(results[0], example))}
