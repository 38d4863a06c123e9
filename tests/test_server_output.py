"""Output processing off the critical path, through the real server: under concurrency each stream's
events arrive in step order with `done` last, and each step's text (rendered incrementally on the output
thread) is the canvas its committed tokens make, decoded whole."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.output import canvas_text
from tests.server_utils import ServerProcess, sse_events
from tzd.checkpoint import load_checkpoint

PROMPTS = ["ROMEO:\nBut soft", "KING.\nNow is the", "First Citizen:\nWe are", "JULIET:\nO Romeo"]


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--max-batch-size", "6",
                       log_dir=tmp_path_factory.mktemp("srvlog")) as s:
        yield s


def stream(url: str, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [(e, json.loads(d)) for e, d in sse_events(r)]


def test_streams_in_step_order_done_last_text_incremental(srv: ServerProcess, tiny_checkpoint: Path) -> None:
    tok = load_checkpoint(tiny_checkpoint, device="cpu").tokenizer
    bodies = [{"prompt": PROMPTS[i % 4], "max_tokens": 12 + 4 * (i % 5), "block_length": 4 * (1 + i % 3),
               "temperature": 1.0 if i % 2 else 0.0, "seed": i, "threshold": 0.5 if i % 3 == 0 else None,
               "stop": ["\n\n"] if i % 4 == 1 else None} for i in range(14)]  # more than the 6 slots
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: stream(srv.url, b), bodies))
    for body, events in zip(bodies, answers, strict=True):
        names = [e for e, _ in events]
        assert names[-1] == "done" and names.count("done") == 1 and "error" not in names, names
        steps = [d for e, d in events if e == "step"]
        assert steps, "no step event"
        indices = [s["step"] for s in steps]
        assert indices == sorted(set(indices)), f"steps out of order: {indices}"
        canvas = [tok.mask_id] * body["max_tokens"]
        for s in steps:
            for c in s["committed"]:
                assert canvas[c["position"]] == tok.mask_id, "a position committed twice"
                canvas[c["position"]] = c["id"]
            assert s["masked"] == canvas.count(tok.mask_id)
            assert s["text"] == canvas_text(tok, canvas, tok.mask_id)  # the whole canvas decoded at once
        done = events[-1][1]
        assert done["steps"] == indices[-1] + 1
        generated = canvas[:len(done["tokens"])]
        assert done["tokens"] == generated
