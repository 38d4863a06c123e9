"""The server's contract from outside: its OpenAPI document says every answer it gives (checked by a bounded
schemathesis run with every check, against `python -m server` on 127.0.0.1), and every answer carries the
request's id, which the structured access log line repeats."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.config import ServerConfig
from tests.server_utils import ROOT, ServerProcess, ThreadServer, metrics, wait_for

KEY = "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCHEMATHESIS_SEED = 20261201
SCHEMATHESIS_EXAMPLES = 50  # per operation and phase: about 600 cases, 15-60 s on 2 cores


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("srvlog")
    keys = tmp / "keys"
    keys.write_text(f"# the contract's key, unlimited\n{KEY} name=contract\nrpm-key name=two-a-minute rpm=2\n"
                    "tpm-key name=few-tokens tpm=20 concurrency=8\n")
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--api-key-file", str(keys), "--max-tokens-limit",
                       "16", "--max-queue", "64", "--max-body-bytes", "65536", "--log-format", "json",
                       log_dir=tmp) as s:
        yield s


def spec(api_keys: tuple[str, ...] = (KEY,)) -> dict:
    return create_app(ServerConfig(checkpoint=Path("unused"), api_keys=api_keys, max_tokens_limit=16)).openapi()


def test_the_spec_documents_every_answer() -> None:
    doc = spec()
    ops = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}
    want = {("GET", "/health"): {"200", "503"}, ("GET", "/metrics"): {"200"},
            ("GET", "/playground/status"): {"200"}, ("GET", "/v1/models"): {"200", "401", "503"},
            ("POST", "/generate"): {"200", "400", "401", "413", "429", "500", "503"},
            ("POST", "/v1/completions"): {"200", "400", "401", "404", "413", "429", "500", "503"},
            ("POST", "/v1/chat/completions"): {"200", "400", "401", "404", "413", "429", "500", "503"},
            ("GET", "/live"): {"200", "503"}}
    assert {k: set(op["responses"]) for k, op in ops.items() if k in want} == want
    probes = ("/health", "/live")  # their 503 is a Health body for the orchestrator, not an error to retry
    for (method, path), op in ops.items():
        for status, answer in op["responses"].items():
            assert answer["headers"]["X-Request-Id"]["required"], (method, path, status)
            if status in ("429", "503") and path not in probes:
                assert answer["headers"]["Retry-After"]["required"], (method, path, status)
            if status.startswith(("4", "5")) and path not in probes:
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "422" not in json.dumps(doc["paths"]) and "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(ops["GET", "/metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    gen = ops["POST", "/generate"]["responses"]["200"]["content"]
    assert set(gen) == {"application/json", "text/event-stream"}
    events = gen["text/event-stream"]["schema"]["oneOf"]
    assert {e["properties"]["event"]["const"]: e["properties"]["data"]["contentSchema"]["$ref"].rsplit("/", 1)[1]
            for e in events} == {"step": "StepEvent", "done": "GenerateResponse", "error": "ErrorBody"}
    chunks = ops["POST", "/v1/completions"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert chunks["properties"]["data"]["anyOf"][0] == {"const": "[DONE]"}
    assert {"StepEvent", "CommittedToken", "ErrorBody"} <= set(doc["components"]["schemas"])
    body = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    assert body["max_tokens"]["maximum"] == 16  # this server's --max-tokens-limit
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    assert ops["POST", "/generate"]["security"] == [{"bearer": []}] and "security" not in ops["GET", "/health"]
    open_doc = spec(api_keys=())  # an open server: no security, no 401
    assert "securitySchemes" not in open_doc["components"] and '"401"' not in json.dumps(open_doc["paths"])


def test_schemathesis_finds_nothing(srv: ServerProcess, tmp_path: Path) -> None:
    """Every check (status codes, content types, headers, bodies and SSE events against the schema, negative
    data rejected, schema-valid data accepted, auth not ignored, wrong methods 405), a fixed seed."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
           "--no-color", "run", f"{srv.url}/openapi.json", "--checks", "all", "--seed", str(SCHEMATHESIS_SEED),
           "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--workers", "1", "--header", f"Authorization: Bearer {KEY}",
           "--request-timeout", "60"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", out)
    assert generated, out[-3000:]
    assert int(generated[1]) >= 300 and generated[1] == generated[2], out[-3000:]
    assert "8 selected / 8 total" in out and "Tested: 8" in out  # every operation, chat and /live included


def test_request_id_is_on_every_answer_and_error_body(srv: ServerProcess) -> None:
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/generate", json={"prompt": "x", "max_tokens": 2}, headers={**AUTH, "X-Request-Id": "trace-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-1"
        for call, status in [(lambda h: c.post("/generate", json={"prompt": "x", "max_tokens": 99},
                                               headers={**AUTH, **h}), 400),
                             (lambda h: c.post("/generate", json={"prompt": "x"}, headers=h), 401),
                             (lambda h: c.get("/nope", headers=h), 404),
                             (lambda h: c.delete("/generate", headers=h), 405),
                             (lambda h: c.post("/generate", content=b"x" * 70_000, headers={**AUTH, **h}), 413)]:
            r = call({"X-Request-Id": f"trace-{status}"})
            assert r.status_code == status, r.text
            assert r.headers["x-request-id"] == r.json()["error"]["request_id"] == f"trace-{status}"
        with c.stream("POST", "/generate", json={"prompt": "x", "max_tokens": 2, "stream": True},
                      headers={**AUTH, "X-Request-Id": "trace-stream"}) as r:
            assert r.headers["x-request-id"] == "trace-stream"
        made = c.get("/health").headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made) and made != c.get("/health").headers["x-request-id"]
        for unusable in (b"", b"has space", b"x" * 129, "caf\u00e9".encode()):
            got = c.get("/health", headers={"X-Request-Id": unusable}).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", got), unusable  # replaced, never echoed into logs as given


def access_lines(srv: ServerProcess) -> list[dict]:
    lines = []
    for line in srv.log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)  # every line is JSON with --log-format json
            if entry["logger"] == "tzd.access":
                lines.append(entry)
    return lines


def test_access_log_is_one_json_line_per_request(srv: ServerProcess) -> None:
    body = {"prompt": "ROMEO:", "max_tokens": 8, "steps": 4, "seed": 1}
    done = httpx.post(f"{srv.url}/generate", json=body, headers={**AUTH, "X-Request-Id": "log-1"}, timeout=60).json()
    httpx.post(f"{srv.url}/v1/completions", json={**body, "n": 2, "stream": True},
               headers={**AUTH, "X-Request-Id": "log-2"}, timeout=60).raise_for_status()
    httpx.post(f"{srv.url}/generate", json={**body, "steps": 9}, headers={**AUTH, "X-Request-Id": "log-3"}, timeout=60)
    assert wait_for(lambda: {"log-1", "log-2", "log-3"} <= {e["request_id"] for e in access_lines(srv)}, timeout=10)
    by_id = {e["request_id"]: e for e in access_lines(srv)}
    one = by_id["log-1"]
    assert (one["method"], one["route"], one["status"], one["outcome"], one["level"]) == \
        ("POST", "/generate", 200, "ok", "INFO")
    assert one["prompt_tokens"] == done["usage"]["prompt_tokens"]
    assert one["generated_tokens"] == done["usage"]["completion_tokens"]
    assert 0 <= one["queue_s"] <= one["total_s"] and one["time"]
    two = by_id["log-2"]
    assert (two["route"], two["status"], two["outcome"]) == ("/v1/completions", 200, "ok")
    assert two["prompt_tokens"] == done["usage"]["prompt_tokens"]  # the prompt once, for n = 2
    three = by_id["log-3"]
    assert (three["status"], three["outcome"], three["error"]) == (400, "rejected", "param=steps")
    assert "prompt_tokens" not in three
    assert not any(e["route"] == "/health" for e in access_lines(srv))  # polls log at DEBUG only


def test_key_limits_are_429_naming_the_limit(srv: ServerProcess) -> None:
    def rejected() -> float:
        return metrics(srv.url).get('tzd_rejected_total{reason="key_limit"}', 0.0)

    before = rejected()
    rpm = {"Authorization": "Bearer rpm-key", "X-Request-Id": "rpm-limited"}
    body = {"prompt": "ROMEO:", "max_tokens": 4, "steps": 2}
    assert [httpx.post(f"{srv.url}/generate", json=body, headers=rpm).status_code for _ in range(2)] == [200, 200]
    for r in (httpx.post(f"{srv.url}/generate", json=body, headers=rpm),
              httpx.get(f"{srv.url}/v1/models", headers=rpm)):
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "key_rpm_limit" and err["type"] == "rate_limit_error"
        assert "'two-a-minute'" in err["message"] and "rpm=2" in err["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 60
    tpm = {"Authorization": "Bearer tpm-key"}
    first = httpx.post(f"{srv.url}/generate", json={"prompt": "ROMEO: " * 4, "max_tokens": 16}, headers=tpm).json()
    assert first["usage"]["total_tokens"] >= 20
    r = httpx.post(f"{srv.url}/generate", json=body, headers=tpm)
    assert r.status_code == 429 and r.json()["error"]["code"] == "key_tpm_limit"
    assert f"{first['usage']['total_tokens']} tokens in the last minute" in r.json()["error"]["message"]
    assert "tpm=20" in r.json()["error"]["message"] and 1 <= int(r.headers["retry-after"]) <= 60
    assert httpx.post(f"{srv.url}/generate", json=body, headers=AUTH).status_code == 200  # other keys unaffected
    assert rejected() - before == 3
    assert wait_for(lambda: any(e.get("key") == "two-a-minute" and e["status"] == 429 for e in access_lines(srv)))


def test_a_bug_is_a_500_error_body_with_the_request_id(tiny_checkpoint: Path) -> None:
    app = create_app(ServerConfig(checkpoint=tiny_checkpoint, dtype="float32"))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with ThreadServer(app) as ts:
        r = httpx.get(f"{ts.url}/boom", headers={"X-Request-Id": "bug-1"}, timeout=30)
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json()["error"] == {"message": "internal server error: RuntimeError", "type": "server_error",
                                 "param": None, "code": None, "request_id": "bug-1"}
