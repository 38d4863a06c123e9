"""The SDK and CLI against the real server (`python -m server` on the tiny trained checkpoint, 127.0.0.1).

The module's server has an API key, one batch slot and one queue place, so that a full queue (429) is
easy to make; the server that goes away mid-stream is a separate process this test kills.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from clients import (
    APIConnectionError,
    AsyncTZDClient,
    AuthenticationError,
    BadRequest,
    Completion,
    RateLimited,
    RetryPolicy,
    ServerUnavailable,
    StepEvent,
    StreamInterrupted,
    TextCompletion,
    TZDClient,
)
from tests.server_utils import ROOT, ServerProcess, metrics, wait_for

KEY = "client-test-key"
PROMPT = "To be, or not"
SMALL = {"max_tokens": 16, "steps": 8, "block_length": 8, "seed": 3}
LONG = {"max_tokens": 80, "steps": 80, "block_length": 80, "cfg_scale": 1.0, "seed": 1}  # 160 forward passes


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--max-batch-size", "1", "--max-queue", "1",
                       "--api-key", KEY, log_dir=tmp_path_factory.mktemp("srvlog")) as s:
        yield s


@pytest.fixture()
def client(srv: ServerProcess):
    with TZDClient(srv.url, api_key=KEY, timeout=60) as c:
        yield c


def raw_generate(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_health_models_complete(srv: ServerProcess, client: TZDClient) -> None:
    assert client.health().status == "ok"
    [card] = client.models()
    assert card.max_model_len == 96
    done = client.generate(PROMPT, **SMALL)
    assert isinstance(done, Completion) and done.model == card.id
    raw = raw_generate(srv.url, {"prompt": PROMPT, **SMALL})
    assert (done.text, done.tokens, done.finish_reason, done.steps, done.nfe, done.seed) == \
        (raw["text"], raw["tokens"], raw["finish_reason"], raw["steps"], raw["nfe"], 3)
    assert done.usage.completion_tokens == len(done.tokens) and done.usage.prompt_tokens > 0
    assert client.generate([10, 11], max_tokens=4).usage.prompt_tokens == 2  # a prompt of token ids
    out = client.complete(PROMPT, model=card.id, **SMALL)  # n=1: this server queues one request at most
    assert isinstance(out, TextCompletion) and [c.text for c in out.choices] == [done.text]
    assert out.usage is not None and out.usage.completion_tokens == len(done.tokens)


def test_server_side_400_names_the_field(client: TZDClient) -> None:
    with pytest.raises(BadRequest) as e:
        client.generate(PROMPT, max_tokens=8, steps=9)  # valid alone; the server checks steps <= max_tokens
    assert e.value.status == 400 and e.value.param == "steps" and "max_tokens=8" in e.value.message
    with pytest.raises(BadRequest) as e:
        client.generate("word " * 200)  # longer than the model's context
    assert e.value.param == "prompt" and "96" in e.value.message
    with pytest.raises(BadRequest) as e:
        client.complete("x", model="not-served", max_tokens=2)
    assert e.value.status == 404 and e.value.param == "model"


def check_stream(events: list) -> Completion:
    """Step events in step order with a masked count that never rises, then the Completion; returns it."""
    *steps, done = events
    assert isinstance(done, Completion) and steps and all(isinstance(s, StepEvent) for s in steps)
    assert [s.step for s in steps] == list(range(len(steps))) and len(steps) == done.steps
    masked = [s.masked for s in steps]
    assert all(a >= b for a, b in zip(masked, masked[1:], strict=False)) and masked[-1] == 0
    assert steps[-1].text == done.text
    committed = {c.position: c.id for s in steps for c in s.committed}
    assert [committed[i] for i in range(len(done.tokens))] == done.tokens
    return done


def test_stream(client: TZDClient) -> None:
    events = list(client.stream(PROMPT, **SMALL))
    done = check_stream(events)
    plain = client.generate(PROMPT, **SMALL)
    assert (done.text, done.tokens, done.steps, done.nfe) == (plain.text, plain.tokens, plain.steps, plain.nfe)
    assert events[0].masked < 16  # the first step already committed some


def test_async_client(srv: ServerProcess, client: TZDClient) -> None:
    want = client.generate(PROMPT, **SMALL)

    async def main() -> None:
        async with AsyncTZDClient(srv.url, api_key=KEY, timeout=60,
                                  retry=RetryPolicy(max_retries=30, max_wait=5)) as ac:
            assert (await ac.health()).status == "ok"
            assert [m.id for m in await ac.models()] == [m.id for m in client.models()]
            done = await ac.generate(PROMPT, **SMALL)
            assert (done.text, done.tokens) == (want.text, want.tokens)
            events = [e async for e in ac.stream(PROMPT, **SMALL)]
            assert check_stream(events).tokens == want.tokens
            assert (await ac.complete(PROMPT, **SMALL)).choices[0].text == want.text
            with pytest.raises(BadRequest):
                ac.stream(PROMPT, max_tokens=0)  # checked at the call, before any request
            # one slot and one queue place: three at once need the third to wait (429, retried) or not
            many = await asyncio.gather(*(ac.generate(PROMPT, **SMALL) for _ in range(3)))
            assert all(m.tokens == want.tokens for m in many)
        async with AsyncTZDClient(srv.url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(AuthenticationError):
                async for _ in bad.stream(PROMPT, **SMALL):
                    pass

    asyncio.run(main())


def test_authentication(srv: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TZD_API_KEY", raising=False)
    for key in (None, "wrong"):
        with TZDClient(srv.url, api_key=key) as c:
            with pytest.raises(AuthenticationError) as e:
                c.generate(PROMPT, max_tokens=2)
            assert e.value.status == 401 and "API key" in e.value.message
            with pytest.raises(AuthenticationError):
                list(c.stream(PROMPT, max_tokens=2))
            with pytest.raises(AuthenticationError):
                c.models()
            assert c.health().status == "ok"  # open without a key
    monkeypatch.setenv("TZD_API_KEY", KEY)
    with TZDClient(srv.url) as c:
        assert c.generate(PROMPT, max_tokens=2).usage.completion_tokens <= 2


class Attempts:
    """An httpx event hook pair that records when each request left and each answer (status) came back."""

    def __init__(self) -> None:
        self.sent: list[float] = []
        self.answers: list[tuple[float, int]] = []

    def hooks(self) -> dict:
        return {"request": [lambda r: self.sent.append(time.monotonic())],
                "response": [lambda r: self.answers.append((time.monotonic(), r.status_code))]}

    @property
    def statuses(self) -> list[int]:
        return [s for _, s in self.answers]


def fill_slot_and_queue(url: str) -> tuple[list[threading.Thread], bool]:
    """Two long streams: one running in the only slot, one in the only queue place; False if not both."""
    def run() -> None:
        with TZDClient(url, api_key=KEY, timeout=120) as c:
            for _ in c.stream(PROMPT, **LONG):
                pass

    def counts() -> tuple[float, float]:
        m = metrics(url)
        return m["tzd_requests_running"], m["tzd_requests_waiting"]

    threads = [threading.Thread(target=run, daemon=True)]
    threads[0].start()
    assert wait_for(lambda: counts()[0] == 1, interval=0.01)
    threads.append(threading.Thread(target=run, daemon=True))
    threads[1].start()
    return threads, wait_for(lambda: counts() == (1, 1), timeout=5, interval=0.01)


def test_429_is_retried_after_retry_after(srv: ServerProcess) -> None:
    """Each 429 is followed by a wait of at least the server's Retry-After (1 s) before the next attempt."""
    for _ in range(3):  # the fill may end before our requests on a fast machine: then fill again
        before = metrics(srv.url).get('tzd_rejected_total{reason="queue_full"}', 0)
        fillers, full = fill_slot_and_queue(srv.url)
        if not full:
            for t in fillers:
                t.join(60)
            continue
        try:
            with TZDClient(srv.url, api_key=KEY, max_retries=0) as once:
                once.generate(PROMPT, max_tokens=2)
        except RateLimited as e:
            assert e.status == 429 and e.retry_after == 1.0 and "queue is full" in e.message
        else:
            for t in fillers:
                t.join(60)
            continue
        log = Attempts()
        t0 = time.monotonic()
        with httpx.Client(event_hooks=log.hooks()) as http, \
                TZDClient(srv.url, api_key=KEY, http_client=http, retry=RetryPolicy(max_retries=30)) as c:
            done = c.generate(PROMPT, max_tokens=2)
        elapsed = time.monotonic() - t0
        for t in fillers:
            t.join(60)
        if log.statuses[0] != 429:
            continue
        assert isinstance(done, Completion)
        rejected = log.statuses.count(429)
        assert log.statuses == [429] * rejected + [200] and len(log.sent) == rejected + 1
        for (answered, _), next_sent in zip(log.answers, log.sent[1:], strict=False):
            assert next_sent - answered >= 0.98  # waited for Retry-After: 1
        assert elapsed >= rejected * 0.98
        after = metrics(srv.url)['tzd_rejected_total{reason="queue_full"}']
        assert after - before == rejected + 1  # the server saw exactly these attempts (and `once`)
        return
    pytest.fail("could not fill the server's slot and queue before the requests arrived (3 tries)")


def test_server_going_away_mid_stream_raises(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A sync and an async stream are running when the server is SIGKILLed: both raise, neither ends quietly."""
    s = ServerProcess(tiny_checkpoint, "--dtype", "float32", log_dir=tmp_path).start()

    async def go() -> None:
        with TZDClient(s.url, timeout=60) as c:
            async with AsyncTZDClient(s.url, timeout=60) as ac:
                sync_events = c.stream(PROMPT, **LONG)
                assert isinstance(next(sync_events), StepEvent)
                async_events = ac.stream(PROMPT, **LONG)
                assert isinstance(await async_events.__anext__(), StepEvent)
                s.proc.kill()  # SIGKILL: no drain, no final event
                s.proc.wait(30)
                seen = []
                with pytest.raises(StreamInterrupted, match="before the final `done` event") as e:
                    async for ev in async_events:
                        seen.append(ev)
                assert isinstance(e.value, ServerUnavailable)
                with pytest.raises(StreamInterrupted, match="before the final `done` event"):
                    for ev in sync_events:
                        seen.append(ev)
                assert all(isinstance(x, StepEvent) for x in seen)  # never a Completion
            with pytest.raises(APIConnectionError, match="ConnectError"):
                TZDClient(s.url, retry=RetryPolicy(max_retries=1, backoff=0.05)).generate(PROMPT, max_tokens=2)

    try:
        asyncio.run(go())
    finally:
        s.stop()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m clients` as a terminal would run it (rich told the pipe is a terminal)."""
    env = {**{k: v for k, v in os.environ.items() if k != "TZD_API_KEY"}, "TTY_COMPATIBLE": "1",
           "TTY_INTERACTIVE": "1", "COLUMNS": "80", **(env or {})}
    return subprocess.run([sys.executable, "-m", "clients", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli(srv: ServerProcess, client: TZDClient) -> None:
    want = client.generate(PROMPT, **SMALL)
    flags = ["--url", srv.url, "--max-tokens", "16", "--steps", "8", "--block-length", "8", "--seed", "3"]

    live = run_cli(PROMPT, *flags, "--stream", env={"TZD_API_KEY": KEY})
    assert live.returncode == 0, live.stderr
    assert live.stdout == want.text + "\n"  # the final text, alone on stdout
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", live.stderr)  # the frames without escape sequences
    positions = [shown.find(f"step {i}/8") for i in range(1, want.steps + 1)]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)  # a frame per step, in order
    assert "\x1b[2m" in live.stderr and "\x1b[1;30;102m" in live.stderr  # masked dimmed, new highlighted
    assert f"done: {want.usage.completion_tokens} tokens, {want.steps} steps" in shown

    js = run_cli(PROMPT, *flags, "--stream", "--json", "--api-key", KEY)
    assert js.returncode == 0, js.stderr
    lines = [json.loads(line) for line in js.stdout.splitlines()]
    assert [e["event"] for e in lines] == ["step"] * want.steps + ["done"]
    assert [e["data"]["step"] for e in lines[:-1]] == list(range(want.steps))
    assert lines[-1]["data"]["text"] == want.text and lines[-1]["data"]["tokens"] == want.tokens

    denied = run_cli(PROMPT, *flags, "--stream", "--api-key", "wrong")
    assert denied.returncode == 1 and "AuthenticationError" in denied.stderr and "API key" in denied.stderr
    bad = run_cli(PROMPT, *flags, "--api-key", KEY, "--json", "--steps", "99")
    assert bad.returncode == 2 and json.loads(bad.stdout)["data"]["error"]["param"] == "steps"
