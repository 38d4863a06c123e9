"""Batch invariance through the real server, in its serving precision: 16 requests at temperature 0 with
mixed prompt lengths and params (steps, block_length, max_tokens, threshold, cache modes) sent at
concurrency 16 get byte-identical text to the same requests sent one at a time.

On CPU the server's default precision is bf16 autocast where the CPU has bf16 units (run here through
tests/bf16_cpu_server.py, which answers only that capability check) and fp32 elsewhere; on CUDA it is
bf16 weights (the CUDA variant, skipped without a GPU, runs in bench/gpu_check.sh).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_utils import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "shakespeare-small"
CACHES = ("none", "prefix", "dual")


def mixed_requests(n: int = 16, seed: int = 1) -> list[dict]:
    """n /generate bodies: prompts of 1-40 words of the README, every param mixed, temperature 0."""
    rng = random.Random(seed)
    words = (ROOT / "README.md").read_text().split()
    bodies = []
    for i in range(n):
        k = rng.randint(1, 40)
        start = rng.randint(0, len(words) - k)
        max_tokens = rng.choice([8, 12, 16, 24])
        block = rng.choice([b for b in (4, 8, 16, 32) if b <= max_tokens])
        bodies.append({"prompt": " ".join(words[start:start + k]), "max_tokens": max_tokens,
                       "block_length": block, "steps": rng.randint(-(-max_tokens // block), min(max_tokens, 8)),
                       "threshold": rng.choice([None, 0.9]), "cache": CACHES[i % 3], "temperature": 0.0})
    return bodies


async def _post_all(url: str, bodies: list[dict]) -> list[str]:
    async with httpx.AsyncClient(timeout=300) as client:
        responses = await asyncio.gather(*(client.post(f"{url}/generate", json=b) for b in bodies))
    for r in responses:
        assert r.status_code == 200, r.text
    return [r.json()["text"] for r in responses]


def concurrent_vs_alone(srv: ServerProcess) -> tuple[list[str], list[str]]:
    """The texts of the 16 requests sent at once, then one at a time."""
    bodies = mixed_requests()
    together = asyncio.run(_post_all(srv.url, bodies))
    with httpx.Client(timeout=300) as client:
        alone = []
        for b in bodies:
            r = client.post(f"{srv.url}/generate", json=b)
            assert r.status_code == 200, r.text
            alone.append(r.json()["text"])
    return together, alone


def _differing(together: list[str], alone: list[str]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(together, alone, strict=True)) if a.encode() != b.encode()]


@pytest.mark.parametrize("module", ["server", "tests.bf16_cpu_server"], ids=["on_cpu_default", "on_cpu_bf16_units"])
def test_concurrent_text_is_byte_identical_to_alone(module: str, tmp_path: Path) -> None:
    srv = ServerProcess(CHECKPOINT, "--device", "cpu", "--deterministic", "on", "--threads", "1",
                        log_dir=tmp_path)
    srv.cmd[2] = module
    with srv:
        together, alone = concurrent_vs_alone(srv)
        log = srv.log_path.read_text()
    if module != "server":
        assert "autocast-bfloat16" in log, log[:3000]  # the precision a CPU with bf16 units serves in
    assert "deterministic on" in log, log[:3000]
    assert _differing(together, alone) == [], f"{len(_differing(together, alone))}/16 differ:\n{log[-3000:]}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
def test_concurrent_text_is_byte_identical_to_alone_cuda(tmp_path: Path) -> None:
    with ServerProcess(CHECKPOINT, "--device", "cuda", "--deterministic", "on", log_dir=tmp_path) as srv:
        together, alone = concurrent_vs_alone(srv)
        log = srv.log_path.read_text()
    assert "bfloat16" in log and "deterministic on" in log, log[:3000]
    assert _differing(together, alone) == [], f"{len(_differing(together, alone))}/16 differ:\n{log[-3000:]}"
