"""Server limits over real HTTP: API keys (401), a full queue (429), client disconnects, SIGTERM draining
(503, then exit 0), a checkpoint that cannot load. The server here is configured through TZD_* environment
variables, and its steps are slowed down (tests/slow_server.py) so that requests are surely in flight while
a test acts."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_utils import ROOT, ServerProcess, long_request, metrics, sse_events, wait_for

KEYS = ("k-one", "k-two")
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


@pytest.fixture(scope="module")
def long(srv: ServerProcess) -> dict:
    return long_request(srv.url, 48, AUTH)


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    env = {"TZD_API_KEY": ",".join(KEYS), "TZD_MAX_BATCH_SIZE": "1", "TZD_MAX_QUEUE": "1", "TZD_DTYPE": "float32",
           "TZD_MODEL_NAME": "limits-test", "TZD_SHUTDOWN_TIMEOUT": "60"}
    with ServerProcess(tiny_checkpoint, env=env, log_dir=tmp_path_factory.mktemp("srvlog"), step_delay=0.025) as s:
        yield s


def running(url: str) -> tuple[float, float]:
    m = metrics(url)
    return m["tzd_requests_running"], m["tzd_requests_waiting"]


def test_environment_configures_the_server(srv: ServerProcess) -> None:
    models = httpx.get(f"{srv.url}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["limits-test"]
    assert 'max_batch_size="1"' in next(k for k in metrics(srv.url) if k.startswith("tzd_model_info"))


@pytest.mark.parametrize(("method", "path"), [("POST", "/generate"), ("POST", "/v1/completions"),
                                              ("GET", "/v1/models")])
@pytest.mark.parametrize("header", [None, "Bearer wrong", "k-one", "Basic k-one", "Bearer", "Bearer k-one-x"])
def test_api_key_required(srv: ServerProcess, method: str, path: str, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = httpx.request(method, f"{srv.url}{path}", json={"prompt": "x", "max_tokens": 2}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"


def test_valid_keys_and_open_endpoints(srv: ServerProcess) -> None:
    before = metrics(srv.url).get('tzd_rejected_total{reason="unauthorized"}', 0)
    assert httpx.post(f"{srv.url}/generate", json={"prompt": "x", "max_tokens": 2}).status_code == 401
    for key in KEYS:
        r = httpx.post(f"{srv.url}/generate", json={"prompt": "x", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
    assert httpx.get(f"{srv.url}/health").status_code == 200
    assert metrics(srv.url)['tzd_rejected_total{reason="unauthorized"}'] == before + 1  # /metrics is open too
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEYS[0], max_retries=0)
    assert oa.completions.create(model="limits-test", prompt="x", max_tokens=2).choices[0].finish_reason
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_is_429_with_retry_after(srv: ServerProcess, long: dict) -> None:
    with httpx.Client(timeout=60, headers=AUTH) as a, httpx.Client(timeout=60, headers=AUTH) as b:
        with a.stream("POST", f"{srv.url}/generate", json={**long, "stream": True}) as ra, \
                b.stream("POST", f"{srv.url}/generate", json={**long, "stream": True}) as rb:
            assert ra.status_code == rb.status_code == 200
            assert wait_for(lambda: running(srv.url) == (1, 1))  # one slot, one queue place: both taken
            r = httpx.post(f"{srv.url}/generate", json={"prompt": "x", "max_tokens": 2}, headers=AUTH)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH)
            assert r.status_code == 429
    assert wait_for(lambda: running(srv.url) == (0, 0))  # both clients left: slot and queue are free
    assert metrics(srv.url)['tzd_rejected_total{reason="queue_full"}'] == 2


def test_disconnect_frees_the_slot(srv: ServerProcess, long: dict) -> None:
    def running_now() -> float:
        return metrics(srv.url)["tzd_requests_running"]

    before = metrics(srv.url)
    with httpx.Client(timeout=60, headers=AUTH) as c, \
            c.stream("POST", f"{srv.url}/generate", json={**long, "stream": True}) as r:
        events = sse_events(r)  # held: a dropped iterator would close the connection now
        assert next(events)[0] == "step"
        assert running_now() == 1
    # the stream is closed mid-generation: the slot frees at the next step boundary
    assert wait_for(lambda: running_now() == 0, timeout=10)
    # a plain request whose client gives up once it runs
    body = json.dumps(long).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Authorization: " + AUTH["Authorization"].encode() + b"\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_for(lambda: running_now() == 1, timeout=10)
    assert wait_for(lambda: running_now() == 0, timeout=10)
    after = metrics(srv.url)
    assert after['tzd_requests_total{endpoint="generate",status="499"}'] - \
        before.get('tzd_requests_total{endpoint="generate",status="499"}', 0) == 2
    assert after["tzd_request_latency_seconds_count"] == before["tzd_request_latency_seconds_count"]  # none finished


def test_sigterm_drains_then_exits_0(srv: ServerProcess, long: dict) -> None:
    """Runs last in this module: it stops the server."""
    results: dict[str, object] = {}

    def stream() -> None:
        with httpx.Client(timeout=60, headers=AUTH) as c, \
                c.stream("POST", f"{srv.url}/generate", json={**long, "stream": True}) as r:
            results["stream"] = [e for e, _ in sse_events(r)]

    def queued() -> None:
        results["queued"] = httpx.post(f"{srv.url}/generate", json=long, headers=AUTH, timeout=60).status_code

    threads = [threading.Thread(target=stream)]
    threads[0].start()
    assert wait_for(lambda: running(srv.url)[0] == 1)
    threads.append(threading.Thread(target=queued))
    threads[1].start()
    assert wait_for(lambda: running(srv.url) == (1, 1))
    assert "connection" not in httpx.get(f"{srv.url}/health").headers  # keep-alive while serving
    srv.terminate()
    assert wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 503, timeout=5)
    h = httpx.get(f"{srv.url}/health")
    # draining: every answer closes its connection, so no idle keep-alive one is left for a load balancer
    # to send its next request on as the process exits
    assert h.json()["status"] == "draining" and h.headers["connection"] == "close"
    r = httpx.post(f"{srv.url}/generate", json={"prompt": "x", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    assert r.headers["connection"] == "close"
    for t in threads:
        t.join(timeout=60)
    assert results["stream"][-1] == "done" and results["queued"] == 200  # in-flight work finished
    assert srv.proc.wait(timeout=30) == 0
    assert "draining" in srv.log()


def test_unloadable_checkpoint_exits_nonzero(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(RuntimeError, match="exited with 1"):
        ServerProcess(bad, log_dir=tmp_path).start()
    proc = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "checkpoint directory not found" in proc.stderr
