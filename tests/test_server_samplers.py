"""entropy_bound and early_exit through the real server on every route: /generate (plain and streamed),
/v1/completions and /v1/chat/completions accept them, forward them to the sampler (the forwards each
request runs, read from /metrics, and the tokens of the offline sampler), refuse both commit rules at
once naming entropy_bound, and count early exit's saved forwards in tzd_early_exit_forwards_saved_total."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.hf_checkpoints import write_dream
from tests.server_utils import ServerProcess, metrics, sse_events, stream_generate
from tzd.checkpoint import load_checkpoint
from tzd.sampling import SamplingParams, generate

pytest.importorskip("transformers")
PROMPT = "To be, or"
MESSAGES = [{"role": "user", "content": "To be, or not?"}]
BODY = {"max_tokens": 24, "block_length": 8}  # 3 blocks; 24 steps
FORWARDS, SAVED = "tzd_forward_passes_total", "tzd_early_exit_forwards_saved_total"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Dream checkpoint (ChatML template) whose head says EOS where it would say the 5th token it
    generates for PROMPT: an EOS early in the canvas, on a model with a chat route."""
    path = write_dream(tmp_path_factory.mktemp("eos") / "model", shard_bytes=None)
    L = load_checkpoint(path, device="cpu")
    [first] = generate(L.model, [L.tokenizer.encode(PROMPT)], SamplingParams(**BODY), L.mask_id)
    swap = [L.tokenizer.eos_ids[0], first.tokens[4]]
    weights = load_file(path / "model.safetensors")
    head = weights["lm_head.weight"]
    head[swap] = head[swap[::-1]].clone()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def srv(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(checkpoint, "--device", "cpu", "--dtype", "float32", "--max-batch-size", "4",
                       log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


def counted(srv: ServerProcess, path: str, body: dict) -> tuple[dict, float, float]:
    """The answer of one request alone on the server, and the forwards it ran and early exit saved."""
    before = metrics(srv.url)
    r = httpx.post(f"{srv.url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    after = metrics(srv.url)
    return r.json(), after[FORWARDS] - before[FORWARDS], after.get(SAVED, 0.0) - before.get(SAVED, 0.0)


ROUTES = [("/generate", {"prompt": PROMPT}), ("/v1/completions", {"prompt": PROMPT}),
          ("/v1/chat/completions", {"messages": MESSAGES}), ("/generate", {"messages": MESSAGES})]


def text_of(path: str, answer: dict) -> tuple[str, str]:
    if path == "/generate":
        return answer["text"], answer["finish_reason"]
    choice = answer["choices"][0]
    return (choice["message"]["content"] if "message" in choice else choice["text"]), choice["finish_reason"]


@pytest.mark.parametrize("path,prompt", ROUTES)
def test_entropy_bound_reaches_the_sampler_on_every_route(srv: ServerProcess, path: str, prompt: dict) -> None:
    base = {**prompt, **BODY, "early_exit": False}
    _, whole, _ = counted(srv, path, {**base, "entropy_bound": 1e9})  # every block in one step
    _, tiny, _ = counted(srv, path, {**base, "entropy_bound": 1e-9})  # one token per step
    assert (whole, tiny) == (3, 24)
    both = httpx.post(f"{srv.url}{path}", json={**base, "entropy_bound": 0.5, "threshold": 0.9}, timeout=60)
    assert both.status_code == 400 and both.json()["error"]["param"] == "entropy_bound", both.text
    bad = httpx.post(f"{srv.url}{path}", json={**base, "entropy_bound": 0}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "entropy_bound", bad.text
    wrong = httpx.post(f"{srv.url}{path}", json={**base, "early_exit": "yes"}, timeout=60)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "early_exit", wrong.text


def test_generate_with_entropy_bound_is_the_offline_sampler(srv: ServerProcess, checkpoint: Path) -> None:
    L = load_checkpoint(checkpoint, device="cpu")
    for extra in ({"entropy_bound": 0.5}, {"entropy_bound": 2.0, "temperature": 1.0, "seed": 3}):
        answer, nfe, _ = counted(srv, "/generate", {"prompt": PROMPT, **BODY, **extra})
        [want] = generate(L.model, [L.tokenizer.encode(PROMPT)], SamplingParams(**BODY, **extra), L.mask_id,
                          eos_id=L.tokenizer.eos_ids, tokenizer=L.tokenizer)
        assert answer["tokens"] == want.tokens and answer["nfe"] == nfe == want.nfe


@pytest.mark.parametrize("path,prompt", ROUTES)
def test_early_exit_on_every_route_same_text_fewer_forwards(srv: ServerProcess, path: str, prompt: dict) -> None:
    body = {**prompt, **BODY}
    on, on_nfe, saved = counted(srv, path, body)  # early_exit defaults to true
    off, off_nfe, none_saved = counted(srv, path, {**body, "early_exit": False})
    assert text_of(path, on) == text_of(path, off) and text_of(path, on)[1] == "stop"
    assert none_saved == 0 and off_nfe == 24  # the whole canvas: every step of the plan
    assert 0 < on_nfe < off_nfe and on_nfe + saved == off_nfe  # the fixed schedule: the saving is exact
    if path == "/generate":
        assert on["nfe"] == on_nfe and off["nfe"] == off_nfe


def test_streams_end_at_the_eos(srv: ServerProcess) -> None:
    body = {"prompt": PROMPT, **BODY}
    with httpx.Client(timeout=120) as c:
        plain = c.post(f"{srv.url}/generate", json=body).json()
        events = stream_generate(c, srv.url, {**body, "stream": True})
        assert events[-1][0] == "done" and events[-1][1]["text"] == plain["text"]
        assert events[-1][1]["finish_reason"] == "stop" and events[-1][1]["nfe"] == plain["nfe"] < 24
        last_step = events[-2][1]
        assert events[-2][0] == "step" and last_step["masked"] == 0  # the rest of the canvas is EOS
        with c.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(d) for _, d in sse_events(r) if d != "[DONE]"]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == plain["text"]
        assert [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == "stop"


def test_openapi_documents_the_fields(srv: ServerProcess) -> None:
    schema = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
    for name in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        props = schema["components"]["schemas"][name]["properties"]
        assert "entropy" in props["entropy_bound"]["description"]
        assert props["early_exit"]["type"] == "boolean" and props["early_exit"]["default"] is True
        assert "EOS" in props["early_exit"]["description"]
