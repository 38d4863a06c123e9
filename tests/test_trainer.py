"""python -m trainer end to end: learning, both backends, resume, DDP, and one-line config errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_OVERRIDES, run_trainer
from tzd.checkpoint import load_checkpoint


def logged(out: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric from the CSV logs (logs/version_N/metrics.csv, one per run or resume)."""
    values: dict[int, float] = {}
    for path in sorted((out / "logs").glob("version_*/metrics.csv")):
        values.update({int(r["step"]): float(r[key]) for r in csv.DictReader(open(path)) if r.get(key)})
    return values


def test_loss_falls_and_checkpoint_loads(tiny_checkpoint: Path) -> None:
    run = tiny_checkpoint.parent
    val = logged(run, "val_nelbo")
    assert sorted(val) == [40, 80, 120]
    # a uniform guess scores ln(V) = 6.24 nats/token; the fixed-seed bound must fall as training goes on
    assert val[120] < val[40] < math.log(512), val
    assert val[120] < math.log(512) - 1.0, val
    loaded = load_checkpoint(tiny_checkpoint)
    meta = loaded.config["training"]
    assert meta["steps"] == 120 and meta["tokens_seen"] == 120 * 16 * 96
    assert meta["validation"]["val_nelbo"] > 0 and meta["validation"]["val_nats_per_char"] > 0
    assert (run / "best" / "config.json").is_file()


@pytest.mark.parametrize("backend", ["smdm", "litgpt"])
def test_backend_trains_saves_reloads(backend: str, tmp_path: Path) -> None:
    out = tmp_path / backend
    run_trainer(*TINY_OVERRIDES, f"model={backend}", "training.max_steps=6", "training.precision=32-true",
                "training.sample_every=6", "training.sample_tokens=16", f"out_dir={out}")
    samples = [json.loads(line) for line in open(out / "logs" / "samples.jsonl")]
    assert {s["temperature"] for s in samples} == {0.5, 1.0} and all(s["step"] == 6 for s in samples)
    loaded = load_checkpoint(out / "last", device="cpu")
    assert loaded.model_config.backend == backend
    state = torch.load(out / "last" / "training_state.pt", map_location="cpu", weights_only=False)
    fresh = type(loaded.model)(loaded.model_config)
    fresh.load_state_dict(state["model"])
    ids = torch.randint(0, loaded.tokenizer.vocab_size, (2, 40))
    assert torch.equal(fresh.eval()(ids), loaded.model(ids))


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    common = [*TINY_OVERRIDES, "training.max_steps=12", "training.log_every=1", "training.eval_every=0",
              "training.precision=32-true", "training.num_threads=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_trainer(*common, f"out_dir={full}")
    run_trainer(*common, "training.stop_at_step=5", f"out_dir={part}")
    assert load_checkpoint(part / "last").config["training"]["steps"] == 5
    proc = run_trainer(*common, "training.resume=auto", f"out_dir={part}")
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = logged(full, "loss"), logged(part, "loss")
    assert set(b) == set(range(1, 13))
    for step in range(6, 13):
        assert a[step] == b[step], (step, a[step], b[step])


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = run_trainer(*TINY_OVERRIDES, "training.max_steps=4", "training.accelerator=cpu", "training.devices=2",
                       "training.strategy=ddp", "training.precision=32-true", "training.num_threads=1",
                       f"out_dir={out}")
    assert "2 process(es)" in proc.stdout + proc.stderr
    meta = load_checkpoint(out / "last").config["training"]
    assert meta["steps"] == 4 and meta["world_size"] == 2 and meta["tokens_seen"] == 4 * 16 * 96 * 2


@pytest.mark.parametrize("overrides,needle", [
    (["model.no_such_key=3"], "no_such_key"),
    (["data=text", "data.path=/nonexistent/corpus.txt"], "data.path=/nonexistent/corpus.txt"),
    (["data=text"], "data.path"),
    (["tokenizer.vocab_size=100"], "tokenizer.vocab_size=100"),
    (["tokenizer.vocab_size=300"], "tokenizer.vocab_size=300"),  # SentencePiece: fewer pieces than characters
    (["model=nope"], "model"),
    (["training.strategy=fsdp", "training.devices=auto"], "training.devices=auto"),
])
def test_bad_config_is_one_line_error(overrides: list[str], needle: str, tmp_path: Path) -> None:
    proc = run_trainer(*overrides, "training.max_steps=1", f"out_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
