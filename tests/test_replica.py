"""What a load balancer and an autoscaler read from one replica: /health (readiness, with the running and
waiting counts), /live (liveness), through loading, load, draining and a dead engine."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

import server.serving
from clients.protocol import Health
from server.app import create_app
from server.config import ServerConfig
from tests.server_utils import ThreadServer, delayed, long_request, sse_events, wait_for, wait_healthy

BODY = {"prompt": "ROMEO:", "max_tokens": 4, "steps": 4, "seed": 1}


def config(checkpoint: Path) -> ServerConfig:
    return ServerConfig(checkpoint=checkpoint, dtype="float32", max_batch_size=1, max_queue=4)


def probe(c: httpx.Client, url: str, route: str) -> tuple[int, Health]:
    r = c.get(f"{url}{route}")
    return r.status_code, Health.model_validate(r.json())


def test_loading_is_live_but_not_ready(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_load = server.serving.load_runtime

    def slow_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        release.wait(60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(server.serving, "load_runtime", slow_load)
    with ThreadServer(create_app(config(tiny_checkpoint))) as ts, httpx.Client(timeout=30) as c:
        code, h = probe(c, ts.url, "/health")
        assert (code, h.status, h.running, h.waiting) == (503, "loading", 0, 0)
        code, h = probe(c, ts.url, "/live")
        assert (code, h.status) == (200, "loading")
        release.set()
        wait_healthy(ts.url, timeout=60)
        code, h = probe(c, ts.url, "/health")
        assert (code, h.status, h.running, h.waiting, h.max_batch_size) == (200, "ok", 0, 0, 1)


def test_health_counts_running_and_waiting_then_draining_stays_live(tiny_checkpoint: Path) -> None:
    app = create_app(config(tiny_checkpoint))
    with ThreadServer(app) as ts, httpx.Client(timeout=60) as c:
        wait_healthy(ts.url)
        long = long_request(ts.url, 32)
        serving = app.state.serving
        batch = serving.engine.batch
        batch.step = delayed(batch.step, 0.05)  # the requests stay in flight while the test looks
        queued: dict[str, int] = {}

        def send_queued() -> None:
            queued["status"] = httpx.post(f"{ts.url}/generate", json=long, timeout=60).status_code

        with c.stream("POST", f"{ts.url}/generate", json={**long, "stream": True}) as r:
            events = sse_events(r)
            assert next(events)[0] == "step"
            waiter = threading.Thread(target=send_queued)
            waiter.start()
            # one slot (max_batch_size=1): the second request waits for it
            assert wait_for(lambda: probe(c, ts.url, "/health")[1].waiting == 1, timeout=10)
            code, h = probe(c, ts.url, "/health")
            assert (code, h.status, h.running, h.waiting) == (200, "ok", 1, 1)

            loop = serving.engine._task.get_loop()
            drained = asyncio.run_coroutine_threadsafe(serving.engine.drain(60), loop)
            assert wait_for(lambda: probe(c, ts.url, "/health")[0] == 503, timeout=5)
            code, h = probe(c, ts.url, "/health")
            assert h.status == "draining" and h.running + h.waiting >= 1  # still finishing what it accepted
            code, h = probe(c, ts.url, "/live")
            assert (code, h.status) == (200, "draining")  # a liveness probe must not kill a draining replica
            assert [e for e, _ in events][-1] == "done"
        assert drained.result(timeout=60) is True  # every accepted request finished
        waiter.join(timeout=60)
        assert queued["status"] == 200  # accepted before the drain, so it was finished, not dropped
        code, h = probe(c, ts.url, "/health")
        assert (code, h.status, h.running, h.waiting) == (503, "draining", 0, 0)


def test_a_dead_engine_is_not_live(tiny_checkpoint: Path) -> None:
    app = create_app(config(tiny_checkpoint))
    with ThreadServer(app) as ts, httpx.Client(timeout=60) as c:
        wait_healthy(ts.url)
        engine = app.state.serving.engine

        def broken_schedule():  # noqa: ANN202
            raise RuntimeError("scheduler bug")

        engine.scheduler.schedule = broken_schedule
        assert c.post(f"{ts.url}/generate", json=BODY).status_code == 500
        for route in ("/health", "/live"):
            code, h = probe(c, ts.url, route)
            assert (code, h.status) == (503, "dead"), route
