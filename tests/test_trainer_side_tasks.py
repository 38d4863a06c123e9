"""Samples sized to the model's context, and side tasks (samples, validation, logging) that fail without
costing the checkpoint: the run still saves out_dir/last, then exits non-zero naming the failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import trainer.__main__ as trainer_main
from tests.conftest import run_trainer
from trainer.data import shakespeare_dir
from trainer.samples import MIN_PROMPT_TOKENS, MIN_SAMPLE_TOKENS, NoRoomForSamples, fit_samples
from tzd.checkpoint import load_checkpoint
from tzd.tokenizer import train_tokenizer

# the issue's command, at tiny sizes (a model whose context is shorter than prompt + sample_tokens=64)
ISSUE = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.context_len": 64,
         "tokenizer.vocab_size": 512, "data": "text", "training.batch_size": 8, "training.eval_batches": 2,
         "training.precision": "32-true", "training.num_threads": 1}


def overrides(**changes: object) -> list[str]:
    """The issue's overrides with some keys changed (given as training__max_steps=3)."""
    merged = {**ISSUE, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [f"{k}={v}" for k, v in merged.items()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One text file of our own (three plays), as a user's corpus."""
    path = tmp_path_factory.mktemp("corpus") / "held.txt"
    works = sorted(shakespeare_dir().glob("*_gut.txt"))[:3]
    path.write_text("".join(w.read_text(encoding="utf-8") for w in works), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_path(corpus: Path) -> Path:
    path = corpus.parent / "tokenizer.model"
    train_tokenizer([corpus.read_text(encoding="utf-8")], 512, path)
    return path


def test_fit_samples_cuts_prompt_first_then_caps_max_tokens() -> None:
    long, short = list(range(28)), [1, 2, 3]
    assert fit_samples([long, short], 16, 96) == ([long, short], 16)  # room for all: untouched
    cut, n = fit_samples([long, short], 64, 64)  # the issue: 28 + 64 > 64
    assert cut == [long[-MIN_PROMPT_TOKENS:], short] and n == 64 - MIN_PROMPT_TOKENS
    cut, n = fit_samples([long], 16, 40)  # the prompt alone gives way: 24 + 16 = 40
    assert cut == [long[-24:]] and n == 16
    cut, n = fit_samples([long], 64, 30)  # prompt at its floor, then max_tokens capped
    assert cut == [long[-MIN_PROMPT_TOKENS:]] and n == 30 - MIN_PROMPT_TOKENS
    assert fit_samples([long], 8, 16) == ([long[-8:]], 8)  # a sample_tokens below the floor is the floor
    with pytest.raises(NoRoomForSamples, match="model.context_len=16"):
        fit_samples([long], 64, 16)  # 8 + 8 < 8 + MIN_SAMPLE_TOKENS
    assert MIN_PROMPT_TOKENS + MIN_SAMPLE_TOKENS > 16


@pytest.mark.parametrize("backend", ["smdm", "litgpt"])
def test_issue_command_samples_fit_and_last_is_saved(backend: str, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    # sample_every and sample_tokens as they default: one sample, at the end
    proc = run_trainer(f"model={backend}", *overrides(data__path=corpus, training__max_steps=3, out_dir=out))
    assert "samples: prompts cut to their last 8 tokens and max_tokens 56" in proc.stdout, proc.stdout
    assert load_checkpoint(out / "last").config["training"]["steps"] == 3
    rows = [json.loads(line) for line in open(out / "logs" / "samples.jsonl")]
    assert len(rows) == 2 and {r["temperature"] for r in rows} == {0.5, 1.0}  # one validation text here
    assert all(r["step"] == 3 and r["max_tokens"] == 64 - MIN_PROMPT_TOKENS for r in rows)


def train_in_process(capsys: pytest.CaptureFixture[str], **changes: object) -> tuple[int, str, str]:
    """trainer.__main__.main, the function `python -m trainer` runs: (exit status, stdout, stderr)."""
    # num_threads=null: leave this test process's torch threads as they are
    rc = trainer_main.main(overrides(training__num_threads="null", **changes))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_context_too_small_for_any_sample_skips_them(corpus: Path, tokenizer_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ctx16"
    rc, stdout, _ = train_in_process(capsys, model__context_len=16, data__path=corpus, tokenizer__path=tokenizer_path,
                                     training__max_steps=2, training__sample_every=1, out_dir=out)
    assert rc == 0
    skipped = [ln for ln in stdout.splitlines() if ln.startswith("samples skipped:")]
    assert skipped == ["samples skipped: model.context_len=16 cannot hold a prompt of 8 tokens plus 16 generated "
                       "ones (training.sample_tokens=64)"], stdout
    assert not (out / "logs" / "samples.jsonl").exists()
    assert load_checkpoint(out / "last").config["training"]["steps"] == 2


def _raise(message: str):
    def fail(*args, **kwargs):
        raise RuntimeError(message)
    return fail


@pytest.mark.parametrize("target,every,named", [
    ("trainer.samples.generate", "sample_every", "samples at steps 2, 4: RuntimeError: injected"),
    ("trainer.loop.evaluate", "eval_every", "validation at steps 2, 4: RuntimeError: injected"),
    ("lightning.fabric.loggers.CSVLogger.log_metrics", "log_every", "logging at steps 2, 4: RuntimeError: injected"),
])
def test_side_task_failure_keeps_last_and_fails_the_run(target: str, every: str, named: str,
                                                        corpus: Path, tokenizer_path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(target, _raise("injected"))
    out = tmp_path / "run"
    every_step = {"training__eval_every": 0, "training__sample_every": 0, "training__log_every": 100,
                  f"training__{every}": 2}  # only the failing task runs, at steps 2 and 4
    rc, stdout, stderr = train_in_process(capsys, model__context_len=96, data__path=corpus,
                                          tokenizer__path=tokenizer_path, training__max_steps=4,
                                          training__sample_tokens=16, training__checkpoint_every=0, out_dir=out,
                                          **every_step)
    assert rc == trainer_main.EXIT_SIDE_TASK_FAILED
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: side tasks failed") and named in error, stderr
    assert stderr.count("Traceback") == 1  # the first failure of a task is logged whole, the second in a line
    assert f"checkpoint: {out / 'last'}" in stdout
    assert load_checkpoint(out / "last").config["training"]["steps"] == 4  # trained on to the end, then saved
