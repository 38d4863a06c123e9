"""Faults inside the server, with the app under uvicorn in a thread so a test can reach into the engine:
an exception inside a step, and requests while the model is still loading."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest

import server.serving
from server.app import create_app
from server.config import ServerConfig
from tests.server_utils import (
    ThreadServer,
    delayed,
    long_request,
    metrics,
    sse_events,
    stream_generate,
    wait_healthy,
)

BODY = {"prompt": "ROMEO:", "max_tokens": 8, "steps": 8, "seed": 1}


def config(checkpoint: Path) -> ServerConfig:
    return ServerConfig(checkpoint=checkpoint, dtype="float32", max_batch_size=4, max_queue=8)


def test_exception_in_a_step_fails_its_requests_and_the_server_keeps_serving(tiny_checkpoint: Path) -> None:
    app = create_app(config(tiny_checkpoint))
    with ThreadServer(app) as ts, httpx.Client(timeout=60) as c:
        wait_healthy(ts.url)
        good = c.post(f"{ts.url}/generate", json=BODY).json()["tokens"]
        batch = app.state.serving.engine.batch
        real_step, faults = batch.step, {"left": 0}

        def faulty_step():  # noqa: ANN202
            if faults["left"]:
                faults["left"] -= 1
                raise RuntimeError("injected fault")
            return real_step()

        batch.step = faulty_step
        faults["left"] = 1
        r = c.post(f"{ts.url}/generate", json=BODY)
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "generation_failed" and "injected fault" in err["message"]

        faults["left"] = 1
        events = stream_generate(c, ts.url, BODY)
        assert events[-1][0] == "error" and "injected fault" in events[-1][1]["error"]["message"]

        faults["left"] = 1
        r = c.post(f"{ts.url}/v1/completions", json={**BODY, "stream": True})
        assert '"error"' in r.text and "[DONE]" not in r.text

        assert c.get(f"{ts.url}/health").status_code == 200
        assert c.post(f"{ts.url}/generate", json=BODY).json()["tokens"] == good  # still serving, same answer
        m = metrics(ts.url)
        assert m["tzd_step_errors_total"] == 3 and m["tzd_requests_running"] == 0
        assert m['tzd_requests_total{endpoint="generate",status="error"}'] == 1
        assert m['tzd_requests_total{endpoint="generate",status="500"}'] == 1


def test_503_while_loading(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_load = server.serving.load_runtime

    def slow_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        release.wait(60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server.serving, "load_runtime", slow_load)
    with ThreadServer(create_app(config(tiny_checkpoint))) as ts, httpx.Client(timeout=60) as c:
        r = c.get(f"{ts.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post(f"{ts.url}/generate", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        assert c.get(f"{ts.url}/v1/models").status_code == 503
        assert c.get(f"{ts.url}/metrics").status_code == 200
        release.set()
        wait_healthy(ts.url, timeout=60)
        assert c.post(f"{ts.url}/generate", json=BODY).status_code == 200


def test_a_dead_engine_fails_requests_and_reports_503(tiny_checkpoint: Path) -> None:
    app = create_app(config(tiny_checkpoint))
    with ThreadServer(app) as ts, httpx.Client(timeout=60) as c:
        wait_healthy(ts.url)
        engine = app.state.serving.engine

        def broken_schedule():  # noqa: ANN202
            raise RuntimeError("scheduler bug")

        engine.scheduler.schedule = broken_schedule
        r = c.post(f"{ts.url}/generate", json=BODY)  # answered with an error, not left hanging
        assert r.status_code == 500 and "engine stopped" in r.json()["error"]["message"]
        r = c.get(f"{ts.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "dead"
        r = c.post(f"{ts.url}/generate", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "dead"


def test_drain_timeout_fails_what_is_left(tiny_checkpoint: Path) -> None:
    app = create_app(config(tiny_checkpoint))
    with ThreadServer(app) as ts, httpx.Client(timeout=60) as c:
        wait_healthy(ts.url)
        long = long_request(ts.url, 64)
        serving = app.state.serving
        batch = serving.engine.batch
        batch.step = delayed(batch.step, 0.02)  # so that the request is surely in flight when the drain begins
        with c.stream("POST", f"{ts.url}/generate", json={**long, "stream": True}) as r:
            events = sse_events(r)
            assert next(events)[0] == "step"
            loop = serving.engine._task.get_loop()
            asyncio.run_coroutine_threadsafe(serving.drain(0.05), loop).result(timeout=30)
            rest = list(events)
        assert rest[-1][0] == "error" and "shut down" in json.loads(rest[-1][1])["error"]["message"]
        assert c.get(f"{ts.url}/health").json()["status"] == "draining"
