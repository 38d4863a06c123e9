"""A bounded soak (bench/soak.py's mix, smaller): mixed good, streamed, slow, dropped and bad requests at
once against `python -m server` on 127.0.0.1; no 5xx, no hang, every kind answered as it should be, and
nothing left running once the load stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.soak import soak
from tests.server_utils import ServerProcess

EXPECTED = {"generate": {"200"}, "stream": {"200"}, "completions": {"200"}, "completions_stream": {"200"},
            "slow_reader": {"200"}, "dropped_stream": {"dropped"}, "bad_field": {"400"}, "malformed_json": {"400"},
            "huge_prompt": {"413"}}


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--max-batch-size", "8", "--max-queue", "256",
                       log_dir=tmp_path_factory.mktemp("srvlog")) as s:
        yield s


def test_mixed_load_gives_no_5xx_no_hang_and_frees_everything(srv: ServerProcess) -> None:
    out = asyncio.run(soak(srv.url, srv.proc.pid, n=300, concurrency=32, deadline=60, seed=7))
    assert (out["5xx"], out["hangs"], out["transport_errors"]) == (0, 0, 0), out
    assert {kind: set(labels) for kind, labels in out["outcomes"].items()} == EXPECTED, out["outcomes"]
    assert out["requests_running_after"] == 0 and out["requests_waiting_after"] == 0
