"""Shared fixtures: a real checkpoint written by the real trainer (tiny, trained for a few seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_OVERRIDES = [
    "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.context_len=96", "tokenizer.vocab_size=512",
    "training.batch_size=16", "training.eval_every=40", "training.eval_batches=2", "training.sample_every=0",
    "training.checkpoint_every=0", "training.log_every=20", "training.lr=3e-3", "training.warmup_steps=10",
]


def run_trainer(*overrides: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m trainer` in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-m", "trainer", *overrides], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer smdm checkpoint trained for 120 steps on the default corpus (about 10-20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    run_trainer(*TINY_OVERRIDES, "training.max_steps=120", "training.precision=32-true", f"out_dir={out}")
    return out / "last"
