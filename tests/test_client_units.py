"""The SDK without a server: no torch on import, the client-only install, parameter checks that send
nothing, retry decisions, Retry-After, the event-stream parser and the CLI's canvas view."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from httpx_sse import EventSource

from clients import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequest,
    Completion,
    EventStream,
    RateLimited,
    RetryPolicy,
    ServerUnavailable,
    StepEvent,
    StreamInterrupted,
    TZDClient,
)
from clients.__main__ import CanvasView, build_parser
from clients.errors import error_from_body, parse_retry_after
from clients.protocol import CommittedToken, GenerateResponse, Timings, Usage
from tests.server_utils import ROOT, free_port


def test_importing_clients_never_imports_torch() -> None:
    code = ("import sys, clients, clients.client, clients.errors, clients.protocol, clients.__main__; "
            "bad = [m for m in ('torch', 'numpy', 'tzd', 'server') if m in sys.modules]; "
            "assert not bad, bad; print('clean')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "clean", proc.stderr


def test_base_install_is_the_client_without_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]]
    assert {"httpx", "pydantic", "rich"} <= set(base)
    assert not {"torch", "numpy", "fastapi", "sentencepiece", "triton"} & set(base)
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["core"])


@pytest.mark.parametrize(("call", "kwargs", "param"), [
    ("generate", {"max_tokens": 0}, "max_tokens"),
    ("generate", {"temprature": 0.5}, "temprature"),
    ("generate", {"remasking": "bogus"}, "remasking"),
    ("generate", {"top_p": 0}, "top_p"),
    ("generate", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("generate", {"stream": True}, "stream"),
    ("stream", {"cache": "all"}, "cache"),
    ("stream", {"seed": -1}, "seed"),
    ("complete", {"echo": True}, "echo"),
    ("complete", {"n": 0}, "n"),
    ("complete", {"stream": True}, "stream"),
])
def test_parameters_are_checked_before_anything_is_sent(call: str, kwargs: dict, param: str) -> None:
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with TZDClient(f"http://127.0.0.1:{free_port()}", http_client=http, max_retries=0) as c:
        with pytest.raises(BadRequest) as e:
            getattr(c, call)("To be", **kwargs)
        assert e.value.param == param and e.value.message.startswith(param) and e.value.status is None
        with pytest.raises(BadRequest) as e:
            c.generate(5)  # type: ignore[arg-type]
        assert e.value.param == "prompt"
    assert sent == []
    http.close()


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZD_BASE_URL", "http://example.invalid:9/")
    monkeypatch.setenv("TZD_API_KEY", " k-one ,k-two")
    with TZDClient() as c:
        assert c.base_url == "http://example.invalid:9"
        assert c._core.headers["Authorization"] == "Bearer k-one"
    with TZDClient("http://h", api_key="", max_retries=7) as c:  # "" = no key, even with TZD_API_KEY set
        assert "Authorization" not in c._core.headers and c.retry.max_retries == 7
    with pytest.raises(ValueError, match="http://"):
        TZDClient("localhost:8000")


def _rate_limited(retry_after: float | None) -> RateLimited:
    return RateLimited("queue full", status=429, retry_after=retry_after)


def test_retry_policy_decisions() -> None:
    p = RetryPolicy(max_retries=3, backoff=0.5, max_backoff=4.0, max_wait=10.0)
    assert p.delay(0, _rate_limited(1.0), sent=True, idempotent=False) == 1.0  # Retry-After, even for a POST
    assert p.delay(0, ServerUnavailable("draining", status=503, retry_after=5.0), sent=True, idempotent=False) == 5.0
    assert p.delay(0, _rate_limited(30.0), sent=True, idempotent=False) is None  # longer than max_wait
    assert p.delay(3, _rate_limited(1.0), sent=True, idempotent=True) is None  # retries used up
    assert RetryPolicy(max_retries=0).delay(0, _rate_limited(1.0), sent=True, idempotent=True) is None
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0)]:  # exponential with jitter when no Retry-After
        assert cap / 2 <= p.delay(attempt, _rate_limited(None), sent=True, idempotent=False) <= cap
    assert p.delay(10, _rate_limited(None), sent=True, idempotent=False) is None
    assert RetryPolicy(max_retries=20, max_backoff=4.0).delay(12, _rate_limited(None), sent=False,
                                                             idempotent=False) <= 4.0
    conn = APIConnectionError("refused")
    assert p.delay(0, conn, sent=False, idempotent=False) is not None  # never reached the server
    assert p.delay(0, conn, sent=True, idempotent=False) is None  # a generation may have run: not again
    assert p.delay(0, conn, sent=True, idempotent=True) is not None
    for status, cls in [(400, BadRequest), (401, AuthenticationError), (500, APIError)]:
        assert p.delay(0, cls("x", status=status), sent=True, idempotent=True) is None


def test_retry_after_and_error_bodies() -> None:
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 1.5 ") == 1.5 and parse_retry_after("-2") == 0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(when) <= 30
    body = {"error": {"message": "queue is full", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
    err = error_from_body(429, body, {"retry-after": "2"})
    assert isinstance(err, RateLimited) and err.retry_after == 2.0 and err.code == "queue_full"
    assert str(err) == "429: queue is full"
    err = error_from_body(400, {"error": {"message": "steps: too many", "type": "invalid_request_error",
                                          "param": "steps"}})
    assert isinstance(err, BadRequest) and err.param == "steps" and err.message == "steps: too many"
    err = error_from_body(502, None, fallback="Bad Gateway")
    assert type(err) is APIError and err.status == 502 and err.message == "Bad Gateway"
    err = error_from_body(None, {"error": {"message": "step failed", "type": "server_error"}})
    assert type(err) is APIError and err.message == "step failed"


def _sse(event: str, data: str) -> list[str]:
    return [f"event: {event}", f"data: {data}", ""]


def _step(i: int, n: int = 4) -> StepEvent:
    committed = [CommittedToken(position=i, id=10 + i, text=f"t{i}")]
    text = "".join(f"t{j}" for j in range(i + 1)) + "_" * (n - i - 1)
    return StepEvent(step=i, steps=n, committed=committed, masked=n - i - 1, text=text)


DONE = GenerateResponse(id="gen-1", model="m", text="t0t1t2t3", tokens=[10, 11, 12, 13], finish_reason="length",
                        usage=Usage(prompt_tokens=2, completion_tokens=4, total_tokens=6), steps=4, nfe=4, seed=1,
                        timings=Timings(queue=0.0, first_step=0.1, total=0.2))


def _parse(lines: list[str]) -> tuple[list, EventStream]:
    """The SDK's reading of a stream whose body is `lines`: httpx-sse's parsing, then EventStream."""
    body = httpx.Response(200, headers={"content-type": "text/event-stream"}, content="\n".join(lines) + "\n")
    decoder, out = EventStream(), []
    for sse in EventSource(body).iter_sse():
        item = decoder.on_event(sse)
        if item is not None:
            out.append(item)
    return out, decoder


def test_event_stream_parser() -> None:
    lines = [": keep-alive", ""]
    for i in range(4):
        lines += _sse("step", _step(i).model_dump_json())
    lines += _sse("other", "{}") + _sse("done", DONE.model_dump_json())
    events, parser = _parse(lines)
    assert [type(e) for e in events] == [StepEvent] * 4 + [Completion] and parser.done
    assert events[-1] == DONE and [e.step for e in events[:-1]] == [0, 1, 2, 3]

    events, parser = _parse(lines[:8])  # cut after two steps: the stream must not end silently
    assert len(events) == 2 and not parser.done
    err = parser.interrupted()
    assert isinstance(err, StreamInterrupted) and isinstance(err, ServerUnavailable)
    assert "after 2 step events" in str(err)

    with pytest.raises(APIError, match="injected fault") as e:
        _parse(_sse("step", _step(0).model_dump_json()) +
               _sse("error", '{"error": {"message": "injected fault", "type": "server_error"}}'))
    assert not isinstance(e.value, StreamInterrupted)
    with pytest.raises(StreamInterrupted, match="malformed 'step' event"):
        _parse(_sse("step", '{"step": 0'))


def test_canvas_view_shows_tokens_masks_and_new_tokens() -> None:
    view = CanvasView("P:", 4)
    assert "waiting" in view.header().plain
    for i in range(2):
        view.update(_step(i))
    assert view.canvas().plain == "P:" + _step(1).text and view.header().plain.startswith("step 2/4")
    styles = {view.canvas().plain[s.start:s.end]: str(s.style) for s in view.canvas().spans}
    assert styles["t1"] == "bold black on bright_green" and "t0" not in styles  # only the latest step's
    assert "dim" in styles["_"] and "P:" in styles
    view.update(StepEvent(step=2, steps=4, committed=[CommittedToken(position=2, id=5, text="\n")], masked=1,
                              text="t0t1\n_"))
    assert view.canvas().plain == "P:t0t1\u21b5\n_"  # a new newline is shown, then plain once older


def test_cli_flags_are_the_sampling_params() -> None:
    args = build_parser().parse_args(["x", "--max-tokens", "8", "--cfg-scale", "0.5", "--cache", "dual",
                                      "--stop", "a", "--stop", "b"])
    assert (args.max_tokens, args.cfg_scale, args.cache, args.stop) == (8, 0.5, "dual", ["a", "b"])
    assert not hasattr(args, "seed")  # left out: the server's default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["x", "--remasking", "bogus"])


def test_connection_refused_is_retried_then_raised() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    attempts: list[float] = []
    http = httpx.Client(event_hooks={"request": [lambda r: attempts.append(time.monotonic())]})
    with TZDClient(url, http_client=http, retry=RetryPolicy(max_retries=2, backoff=0.2)) as c, \
            pytest.raises(APIConnectionError, match="ConnectError"):
        c.generate("x", max_tokens=2)
    assert len(attempts) == 3 and attempts[1] - attempts[0] >= 0.1 and attempts[2] - attempts[1] >= 0.2
    with TZDClient(url) as c, pytest.raises(APIConnectionError):
        c.health()  # tried once
    http.close()
