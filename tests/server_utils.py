"""Helpers for server tests: a real `python -m server` subprocess (or uvicorn in a thread) on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from httpx_sse import EventSource
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll /health until 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


class ServerProcess:
    """`python -m server` as a user starts it; logs go to a file that failures print."""

    def __init__(self, checkpoint: Path, *args: str, env: dict[str, str] | None = None,
                 log_dir: Path | None = None, step_delay: float | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = (log_dir or Path("/tmp")) / f"tzd-server-{self.port}.log"
        module = "server" if step_delay is None else "tests.slow_server"  # see tests/slow_server.py
        self.cmd = [sys.executable, "-m", module, "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
        if step_delay is not None:
            self.env["TZD_TEST_STEP_DELAY"] = str(step_delay)
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> ServerProcess:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            try:
                wait_healthy(self.url, proc=self.proc)
            except Exception as e:
                self.stop()
                raise RuntimeError(f"server did not start ({e}):\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text()[-5000:] if self.log_path.exists() else ""

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ThreadServer:
    """The app under uvicorn in a thread of the test process, so a test can reach into the engine."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream answer, parsed by httpx-sse (as the SDK parses them)."""
    for sse in EventSource(response).iter_sse():
        if sse.data:
            yield sse.event, sse.data


def stream_generate(client: httpx.Client, url: str, body: dict, headers: dict | None = None
                    ) -> list[tuple[str, dict]]:
    """POST /generate with stream=true: every (event, parsed data)."""
    with client.stream("POST", f"{url}/generate", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [(e, json.loads(d)) for e, d in sse_events(r)]


def metrics(url: str) -> dict[str, float]:
    """/metrics parsed by prometheus_client: {'name{label="v",...}': value} per sample."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def long_request(url: str, max_tokens: int, headers: dict | None = None) -> dict:
    """A /generate body that runs all its max_tokens steps (no early EOS), with guidance to double the work.

    The tiny test model may commit EOS early for a given prompt; a seeded sampled request that ran its
    full length alone runs it again (the sampler's noise is a function of seed, step and position).
    """
    for seed in range(32):
        body = {"prompt": "ROMEO:\nBut soft", "max_tokens": max_tokens, "steps": max_tokens,
                "block_length": max_tokens, "cfg_scale": 1.0, "temperature": 1.0, "seed": seed}
        r = httpx.post(f"{url}/generate", json=body, headers=headers, timeout=120)
        r.raise_for_status()
        if r.json()["steps"] == max_tokens:
            return body
    raise AssertionError(f"no seed in 0..31 ran all {max_tokens} steps without EOS")


def delayed(step: Callable[[], list], delay: float) -> Callable[[], list]:
    """`step` slowed by `delay` seconds, so that a test can act while a request is still in flight."""

    def slow_step() -> list:
        time.sleep(delay)
        return step()

    return slow_step
