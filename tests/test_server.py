"""The server over real HTTP: `python -m server` on the tiny trained checkpoint, every endpoint and rule."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from clients.protocol import MASK_PLACEHOLDER, GenerateResponse, StepEvent, TextCompletion
from tests.server_utils import ServerProcess, metrics, sse_events, stream_generate
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.sampling import SamplingParams, generate

PROMPT = "ROMEO:\nBut soft, what light"
REQUIRED_METRICS = [
    "tzd_requests_total", "tzd_requests_running", "tzd_requests_waiting", "tzd_batch_size_count",
    "tzd_step_duration_seconds_count", "tzd_time_to_first_step_seconds_count", "tzd_request_latency_seconds_count",
    "tzd_queue_time_seconds_count", "tzd_prompt_tokens_total", "tzd_generated_tokens_total",
    "tzd_forward_passes_total", "tzd_tokens_per_forward_count", "tzd_rejected_total", "tzd_model_info"]


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--max-batch-size", "8", "--max-queue", "32",
                       "--max-tokens-limit", "64", "--max-body-bytes", "65536",
                       log_dir=tmp_path_factory.mktemp("srvlog")) as s:
        yield s


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def offline(tiny_checkpoint: Path) -> Loaded:
    return load_checkpoint(tiny_checkpoint, device="cpu")


def post(client: httpx.Client, url: str, body: dict) -> dict:
    r = client.post(f"{url}/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_models(srv: ServerProcess, client: httpx.Client, tiny_checkpoint: Path) -> None:
    r = client.get(f"{srv.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.get(f"{srv.url}/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert card["id"] == tiny_checkpoint.parent.name and card["max_model_len"] == 96
    assert "params" in srv.log() and "device cpu" in srv.log()  # the load is logged


def test_generate_matches_the_offline_sampler(srv: ServerProcess, client: httpx.Client, offline: Loaded) -> None:
    body = {"prompt": PROMPT, "max_tokens": 24, "steps": 12, "block_length": 8, "seed": 7}
    data = GenerateResponse.model_validate(post(client, srv.url, body))
    tok = offline.tokenizer
    ids = tok.encode(PROMPT)
    [want] = generate(offline.model, [ids], SamplingParams(max_tokens=24, steps=12, block_length=8, seed=7),
                      offline.mask_id, eos_id=tok.eos_id, tokenizer=tok)
    assert data.tokens == want.tokens and data.text == want.text == tok.decode(data.tokens)
    assert (data.steps, data.nfe, data.finish_reason, data.seed) == (want.steps, want.nfe, want.finish_reason, 7)
    assert data.usage.prompt_tokens == len(ids) and data.usage.completion_tokens == len(data.tokens)
    assert data.usage.total_tokens == len(ids) + len(data.tokens)
    assert data.id.startswith("gen-") and data.model
    t = data.timings
    assert 0 <= t.queue <= t.first_step <= t.total
    again = GenerateResponse.model_validate(post(client, srv.url, body))
    assert again.tokens == data.tokens and again.id != data.id


def test_generate_stream_has_one_event_per_step_then_done(srv: ServerProcess, client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 16, "steps": 8, "block_length": 8, "seed": 3}
    events = stream_generate(client, srv.url, body)
    names = [e for e, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"step"}
    steps = [StepEvent.model_validate(d) for _, d in events[:-1]]
    done = GenerateResponse.model_validate(events[-1][1])
    assert [s.step for s in steps] == list(range(len(steps))) and len(steps) == done.steps
    assert all(s.steps == 8 for s in steps)
    masked = [s.masked for s in steps]
    assert masked == sorted(masked, reverse=True) and len(set(masked)) == len(masked)
    positions = [c.position for s in steps for c in s.committed]
    assert len(positions) == len(set(positions)) == 16 - steps[-1].masked
    assert steps[0].text.count(MASK_PLACEHOLDER) >= steps[0].masked > 0  # masked positions are shown
    elapsed = [s.elapsed for s in steps]  # the server's time of writing each event, from acceptance
    assert None not in elapsed and 0 < elapsed[0] and elapsed == sorted(elapsed)
    assert elapsed[-1] <= done.timings.total + 0.5  # written at most a moment after its step was dispatched
    committed = {c.position: c.id for s in steps for c in s.committed}
    assert all(committed[i] == t for i, t in enumerate(done.tokens))  # the final tokens are the committed ones
    plain = GenerateResponse.model_validate(post(client, srv.url, body))
    assert (plain.tokens, plain.text, plain.steps, plain.nfe, plain.finish_reason) == \
        (done.tokens, done.text, done.steps, done.nfe, done.finish_reason)


def test_concurrent_requests_with_different_params_match_alone(srv: ServerProcess, client: httpx.Client) -> None:
    bodies = [
        {"prompt": "ROMEO:", "max_tokens": 8, "steps": 8, "seed": 1},
        {"prompt": PROMPT * 2, "max_tokens": 24, "steps": 12, "block_length": 8, "cache": "prefix", "seed": 2},
        {"prompt": "JULIET:\nO Romeo", "max_tokens": 32, "steps": 16, "block_length": 16, "cache": "dual", "seed": 3},
        {"prompt": "HAMLET:", "max_tokens": 16, "steps": 16, "threshold": 0.5, "seed": 4},
        {"prompt": "KING:", "max_tokens": 16, "steps": 8, "temperature": 0.8, "top_k": 20, "seed": 5},
        {"prompt": "First Citizen:", "max_tokens": 12, "steps": 6, "remasking": "random", "cfg_scale": 1.0,
         "seed": 6},
    ]
    assert_same_alone_and_together(srv, client, bodies)


def assert_same_alone_and_together(srv: ServerProcess, client: httpx.Client, bodies: list[dict]) -> None:
    """Each body gives the same tokens alone and sent concurrently (sharing denoising steps)."""
    alone = [post(client, srv.url, b)["tokens"] for b in bodies]
    before = metrics(srv.url)
    barrier = threading.Barrier(len(bodies))

    def run(i: int) -> list[int]:
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            if i % 2:  # streaming and plain requests share the batch
                return stream_generate(c, srv.url, bodies[i])[-1][1]["tokens"]
            return post(c, srv.url, bodies[i])["tokens"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(run, range(len(bodies))))
    assert together == alone
    after = metrics(srv.url)
    steps = after["tzd_batch_size_count"] - before["tzd_batch_size_count"]
    single = after['tzd_batch_size_bucket{le="1.0"}'] - before['tzd_batch_size_bucket{le="1.0"}']
    assert steps > single  # some steps ran several of these requests together


def test_openai_client(srv: ServerProcess, client: httpx.Client) -> None:
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    [model] = [m.id for m in oa.models.list()]
    extra = {"steps": 8, "block_length": 8}
    r = oa.completions.create(model=model, prompt=["ROMEO:", "JULIET:"], n=2, max_tokens=16, seed=5,
                              extra_body=extra)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    native = [post(client, srv.url, {"prompt": p, "max_tokens": 16, "seed": 5, **extra}) for p in ("ROMEO:", "JULIET:")]
    assert [c.text for c in r.choices] == [native[0]["text"]] * 2 + [native[1]["text"]] * 2  # greedy: n alike
    assert r.usage.prompt_tokens == sum(n["usage"]["prompt_tokens"] for n in native)
    assert r.usage.completion_tokens == 2 * sum(n["usage"]["completion_tokens"] for n in native)
    assert all(c.finish_reason == n["finish_reason"] for c, n in zip(r.choices[::2], native, strict=True))

    chunks = list(oa.completions.create(model=model, prompt="ROMEO:", max_tokens=16, seed=5, stream=True,
                                        stream_options={"include_usage": True}, extra_body=extra))
    text = "".join(c.text for ch in chunks for c in ch.choices)
    assert text == native[0]["text"]
    assert [c.finish_reason for ch in chunks for c in ch.choices][-1] == native[0]["finish_reason"]
    assert chunks[-1].usage.completion_tokens == native[0]["usage"]["completion_tokens"]
    assert len(chunks) >= 2  # the prefix arrives as it grows, not in one piece
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="not-this-one", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=model, prompt="x", max_tokens=8, extra_body={"steps": 100})
    assert e.value.body["param"] == "steps"


def test_streamed_usage_counts_each_prompt_once(srv: ServerProcess, client: httpx.Client) -> None:
    """OpenAI's usage: prompt_tokens counts each prompt once however many choices (n) it has, streamed or not."""
    body = {"prompt": ["ROMEO:", "JULIET:\nO Romeo"], "n": 3, "max_tokens": 8, "steps": 4, "seed": 2}
    plain = client.post(f"{srv.url}/v1/completions", json=body).json()
    native = [post(client, srv.url, {"prompt": p, "max_tokens": 8, "steps": 4, "seed": 2}) for p in body["prompt"]]
    want_prompt = sum(n["usage"]["prompt_tokens"] for n in native)
    assert plain["usage"]["prompt_tokens"] == want_prompt
    with client.stream("POST", f"{srv.url}/v1/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        datas = [d for _, d in sse_events(r)]
    assert datas[-1] == "[DONE]"
    usage = TextCompletion.model_validate_json(datas[-2]).usage
    assert usage is not None and usage.prompt_tokens == want_prompt
    assert usage.completion_tokens == plain["usage"]["completion_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_more_choices_than_the_queue_holds_is_400_not_429(srv: ServerProcess, client: httpx.Client) -> None:
    """prompts x n above --max-queue (32 here) could never be queued: a 400 naming n, not a 429 to retry forever."""
    before = metrics(srv.url)
    r = client.post(f"{srv.url}/v1/completions", json={"prompt": ["a", "b", "c"], "n": 11, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n" and "33 completions" in err["message"] and "queue of 32" in err["message"]
    after = metrics(srv.url)
    assert after['tzd_rejected_total{reason="invalid"}'] - before['tzd_rejected_total{reason="invalid"}'] == 1
    assert (after.get('tzd_rejected_total{reason="queue_full"}', 0)
            == before.get('tzd_rejected_total{reason="queue_full"}', 0))
    # exactly the queue's size is accepted (an idle server: every choice finds a place)
    r = client.post(f"{srv.url}/v1/completions", json={"prompt": ["a", "b"], "n": 16, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 32


def test_stop_strings_end_the_request(srv: ServerProcess, client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 24, "steps": 24, "block_length": 8, "seed": 11}
    full = post(client, srv.url, body)["text"]
    assert len(full) >= 4
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = full[:full.find(stop)]
    cut = post(client, srv.url, {**body, "stop": stop})
    assert cut["text"] == want and cut["finish_reason"] == "stop"
    assert cut["steps"] <= 24
    # the OpenAI stream never sends text past (or into) the stop string
    with client.stream("POST", f"{srv.url}/v1/completions",
                       json={**body, "stop": [stop], "stream": True}) as r:
        datas = [d for _, d in sse_events(r)]
    assert datas[-1] == "[DONE]"
    chunks = [TextCompletion.model_validate_json(d) for d in datas[:-1]]
    assert "".join(c.text for ch in chunks for c in ch.choices) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


LONG_PROMPT_IDS = [10] * 50
BAD_REQUESTS = [
    ("/generate", {"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("/generate", {"prompt": "x", "temprature": 0.5}, "temprature", "Extra inputs"),
    ("/generate", {"prompt": "x", "temperature": -1}, "temperature", ""),
    ("/generate", {"prompt": "x", "max_tokens": 8, "steps": 9}, "steps", "max_tokens=8"),
    ("/generate", {"prompt": "x", "max_tokens": 8, "block_length": 2, "steps": 3}, "steps", "number of blocks"),
    ("/generate", {"prompt": "word " * 200}, "prompt", "context is 96"),
    ("/generate", {"prompt": LONG_PROMPT_IDS, "max_tokens": 60}, "max_tokens", "context of 96"),
    ("/generate", {"prompt": "x", "max_tokens": 65}, "max_tokens", "<= 64"),
    ("/generate", {"prompt": "x", "cache": "bogus"}, "cache", "'none', 'prefix' or 'dual'"),
    ("/generate", {"prompt": "x", "top_p": 0}, "top_p", ""),
    ("/generate", {"prompt": [7, 4, 9]}, "prompt", "mask"),
    ("/generate", {"prompt": [100000]}, "prompt", "vocabulary"),
    ("/generate", {"prompt": 5}, "prompt", "valid string"),
    ("/generate", {"max_tokens": 4}, "prompt", "required"),
    ("/generate", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("/generate", {"prompt": "x", "stream": "maybe"}, "stream", "boolean"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo", "not supported"),
    ("/v1/completions", {"prompt": []}, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n", ""),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ("/v1/completions", {"prompt": "x", "steps": 0}, "steps", ""),
    ("/v1/completions", {"prompt": "x", "max_tokens": 99}, "max_tokens", "<= 64"),
]


@pytest.mark.parametrize(("path", "body", "param", "text"), BAD_REQUESTS,
                         ids=[f"{p}:{param}:{i}" for i, (p, _, param, _) in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_400_naming_the_field(srv: ServerProcess, client: httpx.Client, path: str, body: dict,
                                               param: str, text: str) -> None:
    r = client.post(f"{srv.url}{path}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert text in err["message"] and err["message"].startswith(param)


def test_malformed_json_and_unknown_routes(srv: ServerProcess, client: httpx.Client) -> None:
    r = client.post(f"{srv.url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post(f"{srv.url}/generate", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.get(f"{srv.url}/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = client.get(f"{srv.url}/generate")
    assert r.status_code == 405 and "error" in r.json()


def test_body_size_limit(srv: ServerProcess, client: httpx.Client) -> None:
    big = json.dumps({"prompt": "a" * 70_000}).encode()
    r = client.post(f"{srv.url}/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = client.post(f"{srv.url}/generate", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_metrics_parse_and_move(srv: ServerProcess, client: httpx.Client) -> None:
    before = metrics(srv.url)
    for name in REQUIRED_METRICS:
        assert any(k == name or k.startswith(name + "{") for k in before), name
    info = [k for k in before if k.startswith("tzd_model_info{")]
    assert info and 'device="cpu"' in info[0] and 'dtype="float32"' in info[0]
    data = post(client, srv.url, {"prompt": PROMPT, "max_tokens": 16, "steps": 8, "block_length": 8, "seed": 2})
    assert client.post(f"{srv.url}/generate", json={"prompt": "x", "max_tokens": -1}).status_code == 400
    after = metrics(srv.url)

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved('tzd_requests_total{endpoint="generate",status="200"}') == 1
    assert moved('tzd_requests_total{endpoint="generate",status="400"}') == 1
    assert moved('tzd_rejected_total{reason="invalid"}') == 1
    assert moved("tzd_prompt_tokens_total") == data["usage"]["prompt_tokens"]
    assert moved("tzd_generated_tokens_total") == data["usage"]["completion_tokens"]
    steps = data["steps"]  # 8, fewer if EOS ended it
    assert moved("tzd_forward_passes_total") == data["nfe"] == steps
    assert moved("tzd_batch_size_count") == steps and moved("tzd_batch_size_sum") == steps  # alone: batch of 1
    assert moved("tzd_step_duration_seconds_count") == steps
    assert moved("tzd_tokens_per_forward_count") == 1
    if data["finish_reason"] == "length":
        assert moved("tzd_tokens_per_forward_sum") == 16 / 8
    for name in ("tzd_request_latency_seconds_count", "tzd_queue_time_seconds_count",
                 "tzd_time_to_first_step_seconds_count"):
        assert moved(name) == 1, name
    assert after["tzd_requests_running"] == 0 and after["tzd_requests_waiting"] == 0
