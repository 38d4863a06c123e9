"""Streams under a slow world: keep-alive comments while a request waits behind a full batch, deadlines (the
`timeout` field and --request-timeout) that end a request with the text so far and free its slot, and a
reader that falls behind, whose step updates are merged instead of piling up."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from clients.protocol import GenerateResponse, SamplingParams
from server.app import create_app
from server.config import ServerConfig
from server.keys import ApiKey, KeyLimits
from server.request import STREAM_BACKLOG
from tests.server_utils import (
    ServerProcess,
    ThreadServer,
    delayed,
    long_request,
    metrics,
    sse_events,
    wait_for,
    wait_healthy,
)

KEEPALIVE = 0.2


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--max-batch-size", "1", "--max-queue", "4",
                       "--sse-keepalive", str(KEEPALIVE), log_dir=tmp_path_factory.mktemp("srvlog"),
                       step_delay=0.02) as s:
        yield s


@pytest.fixture(scope="module")
def long(srv: ServerProcess) -> dict:
    return long_request(srv.url, 48)  # 96 forward passes at >= 20 ms a step: about 1-3 s


def occupy_the_slot(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """A plain request in the only slot (in a thread); returns once it runs."""
    out: dict = {}

    def run() -> None:
        out["answer"] = httpx.post(f"{url}/generate", json=body, timeout=120).json()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert wait_for(lambda: metrics(url)["tzd_requests_running"] == 1, interval=0.01)
    return t, out


def test_keepalive_comments_while_waiting_behind_a_full_batch(srv: ServerProcess, long: dict) -> None:
    t, _ = occupy_the_slot(srv.url, long)
    comments, first_event_at, t0 = [], None, time.monotonic()
    with httpx.stream("POST", f"{srv.url}/generate", json={**long, "max_tokens": 4, "steps": 4, "block_length": 4,
                                                            "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(":"):
                comments.append((time.monotonic() - t0, line))
            elif line.startswith("event:") and first_event_at is None:
                first_event_at = time.monotonic() - t0
    t.join(60)
    waited = [c for c in comments if c[0] < first_event_at]
    assert len(waited) >= 2, (comments, first_event_at)  # the queue wait is >= 1 s: several comments in it
    assert all(line == ": keep-alive" for _, line in comments)
    gaps = [b[0] - a[0] for a, b in zip(waited, waited[1:], strict=False)]
    assert all(KEEPALIVE * 0.5 <= g <= KEEPALIVE * 5 for g in gaps), gaps


def test_timeout_ends_with_the_text_so_far_and_frees_the_slot(srv: ServerProcess, long: dict) -> None:
    full = GenerateResponse.model_validate(httpx.post(f"{srv.url}/generate", json=long, timeout=120).json())
    before = metrics(srv.url)
    t0 = time.monotonic()
    timed = GenerateResponse.model_validate(
        httpx.post(f"{srv.url}/generate", json={**long, "timeout": 0.5}, timeout=120).json())
    took = time.monotonic() - t0
    assert timed.finish_reason == "timeout" and 0 < timed.steps < full.steps and took < 5
    assert timed.tokens == full.tokens[:len(timed.tokens)]  # the committed left-to-right prefix so far
    assert timed.text == full.text[:len(timed.text)] and 0.45 <= timed.timings.total < 2
    # streamed: the done event says timeout too; and a request that times out while waiting for the slot
    t, _ = occupy_the_slot(srv.url, long)
    events = []
    with httpx.stream("POST", f"{srv.url}/generate", json={**long, "stream": True, "timeout": 0.3}, timeout=60) as r:
        events = [(e, json.loads(d)) for e, d in sse_events(r)]
    waited = GenerateResponse.model_validate(events[-1][1])
    assert [e for e, _ in events] == ["done"] and waited.finish_reason == "timeout"
    assert (waited.steps, waited.tokens, waited.text) == (0, [], "")
    chunk_events = []
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**long, "stream": True, "timeout": 0.3},
                      timeout=60) as r:
        chunk_events = [d for _, d in sse_events(r)]
    assert chunk_events[-1] == "[DONE]" and json.loads(chunk_events[-2])["choices"][0]["finish_reason"] == "timeout"
    t.join(60)
    assert wait_for(lambda: metrics(srv.url)["tzd_requests_running"] == 0
                    and metrics(srv.url)["tzd_requests_waiting"] == 0)
    assert metrics(srv.url)["tzd_request_timeouts_total"] - before["tzd_request_timeouts_total"] == 3
    r = httpx.post(f"{srv.url}/generate", json={"prompt": "x", "timeout": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout"


def test_request_timeout_flag_and_a_reader_that_falls_behind(tiny_checkpoint: Path) -> None:
    cfg = ServerConfig(checkpoint=tiny_checkpoint, dtype="float32", max_batch_size=2, max_queue=4)
    app = create_app(cfg)
    with ThreadServer(app) as ts:
        wait_healthy(ts.url)
        serving = app.state.serving
        engine = serving.engine
        loop = engine._task.get_loop()
        body = {"prompt": "ROMEO:", "max_tokens": 64, "steps": 64, "block_length": 64, "seed": 3}
        # a reader that reads nothing until its request is done: at most STREAM_BACKLOG updates wait
        def coalesced() -> float:
            return serving.metrics.registry.get_sample_value("tzd_stream_events_coalesced_total")

        before = coalesced()

        async def submit():  # noqa: ANN202
            group = serving.new_group("gen", ["ROMEO:"], [SamplingParams(**{k: v for k, v in body.items()
                                                                            if k != "prompt"})], "events")
            engine.submit(group)
            return group

        group = asyncio.run_coroutine_threadsafe(submit(), loop).result(30)
        assert wait_for(lambda: group.requests[0].done, timeout=30)
        held = len(group.queue)
        assert held <= STREAM_BACKLOG

        async def read_all():  # noqa: ANN202
            return [up async for _, up in group.updates()]

        ups = asyncio.run_coroutine_threadsafe(read_all(), loop).result(30)
        result = ups[-1].result
        assert result is not None and len(ups) == held
        steps = [u.event.step for u in ups]
        assert steps == sorted(set(steps)) and steps[-1] == result.steps - 1
        committed = [(c.position, c.id) for u in ups for c in u.event.committed]
        positions = [p for p, _ in committed]
        assert len(positions) == len(set(positions)) == 64 - ups[-1].event.masked  # merged, none lost or doubled
        assert [dict(committed)[i] for i in range(len(result.tokens))] == result.tokens
        assert coalesced() - before == result.steps - held
        # the same request over HTTP, read at once, gets every step: and the same tokens
        alone = httpx.post(f"{ts.url}/generate", json=body, timeout=60).json()
        assert alone["tokens"] == result.tokens and alone["finish_reason"] == result.finish_reason
        # --request-timeout: a request slower than 0.4 s ends there with the text so far
        serving.config = cfg.model_copy(update={"request_timeout": 0.4})
        engine.batch.step = delayed(engine.batch.step, 0.05)
        timed = httpx.post(f"{ts.url}/generate", json=body, timeout=60).json()
        assert timed["finish_reason"] == "timeout" and 0 < timed["steps"] < 64 and timed["timings"]["total"] < 2
        assert timed["tokens"] == alone["tokens"][:len(timed["tokens"])]
        longer = httpx.post(f"{ts.url}/generate", json={**body, "timeout": 30}, timeout=60).json()
        assert longer["finish_reason"] == "timeout"  # a request's own timeout cannot lengthen the server's


def test_a_key_over_its_concurrency_limit_is_429_until_its_request_ends(tiny_checkpoint: Path) -> None:
    key = ApiKey("solo-key", "solo", KeyLimits(concurrency=1))
    app = create_app(ServerConfig(checkpoint=tiny_checkpoint, dtype="float32", max_batch_size=2, api_keys=(key,)))
    auth = {"Authorization": "Bearer solo-key"}
    with ThreadServer(app) as ts, httpx.Client(timeout=60, headers=auth) as c:
        wait_healthy(ts.url)
        engine = app.state.serving.engine
        engine.batch.step = delayed(engine.batch.step, 0.02)
        body = {"prompt": "ROMEO:", "max_tokens": 32, "steps": 32, "block_length": 32, "stream": True}
        with c.stream("POST", f"{ts.url}/generate", json=body) as r:
            events = sse_events(r)
            assert next(events)[0] == "step"
            refused = httpx.post(f"{ts.url}/generate", json={"prompt": "x", "max_tokens": 2}, headers=auth)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "key_concurrency_limit"
            assert "concurrency=1" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"
            assert list(events)[-1][0] == "done"
        assert wait_for(lambda: c.post(f"{ts.url}/generate", json={"prompt": "x", "max_tokens": 2}).status_code == 200)
