"""Infilling and logprobs through the server: `python -m server` on the default model in models/ (and on the
block-diffusion model beside it), reached over HTTP and through the openai client.

The suffix is kept verbatim (it is not in the answer; the answer fits between prompt and suffix), the canvas
has exactly max_tokens positions, streamed and not agree, n and stop work, an infill of several gaps
returns its text parts verbatim, and bad input is a 400 naming the field.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.server_utils import ServerProcess, stream_generate
from tzd.checkpoint import load_checkpoint
from tzd.sampling import Layout, SamplingParams, generate

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "shakespeare-small"
PREFIX = "ROMEO:\nBut soft, what light through yonder "
SUFFIX = " breaks? It is the east, and Juliet is the sun."


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(MODEL, "--dtype", "float32", "--max-batch-size", "4", "--max-tokens-limit", "64",
                       log_dir=tmp_path_factory.mktemp("infill-srv")) as s:
        yield s


@pytest.fixture(scope="module")
def oa(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def post(url: str, body: dict) -> dict:
    r = httpx.post(url, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_suffix_matches_offline_and_keeps_the_canvas_length(srv: ServerProcess) -> None:
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12, "seed": 4, "logprobs": True}
    out = post(f"{srv.url}/generate", body)
    ckpt = load_checkpoint(MODEL, device="cpu", dtype=torch.float32)
    tok = ckpt.tokenizer
    [want] = generate(ckpt.model, [tok.encode(PREFIX)], SamplingParams(max_tokens=12, seed=4), ckpt.mask_id,
                      eos_id=tok.eos_ids, tokenizer=tok, layouts=[Layout.gap(12, tok.encode(SUFFIX))])
    assert out["tokens"] == want.tokens and out["text"] == want.text and out["gaps"] == [want.text]
    assert out["steps"] == 12 and len(out["tokens"]) <= 12  # the canvas: exactly max_tokens positions
    assert SUFFIX not in out["text"]
    assert [t["id"] for t in out["logprobs"]] == out["tokens"]
    assert [round(t["logprob"], 4) for t in out["logprobs"]] == [round(s.logprob, 4) for s in want.logprobs]

    with httpx.Client(timeout=120) as client:
        events = stream_generate(client, srv.url, body)
    steps = [d for e, d in events if e == "step"]
    assert len(steps) == 12 and all(len(s["text"]) > 0 for s in steps)
    assert all(c["logprob"] <= 0 for s in steps for c in s["committed"])  # each commit's confidence
    done = events[-1][1]
    assert events[-1][0] == "done" and done["tokens"] == out["tokens"] and done["logprobs"] == out["logprobs"]


def test_completions_suffix_through_the_openai_client(srv: ServerProcess, oa: openai.OpenAI) -> None:
    model = oa.models.list().data[0].id
    extra = {"seed": 7, "temperature": 0.9}
    done = oa.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=10, n=2, logprobs=2,
                                 extra_body=extra)
    native = post(f"{srv.url}/generate", {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 10, **extra})
    assert done.choices[0].text == native["text"]  # choice j has seed + j: choice 0 is the native answer
    assert done.choices[1].text != done.choices[0].text
    for c in done.choices:
        lp = c.logprobs
        assert "".join(lp.tokens) == c.text and len(lp.token_logprobs) == len(lp.tokens)
        assert all(len(t) <= 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs,
                                                                               strict=True))
    stream = oa.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=10, stream=True,
                                   extra_body=extra)
    chunks = list(stream)
    assert "".join(c.text for ch in chunks for c in ch.choices) == done.choices[0].text
    # stop works on the middle: the text ends before it, the suffix is still not part of the answer
    words = done.choices[0].text.split()
    if len(words) > 1:
        cut = oa.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=10, stop=[words[1]],
                                    extra_body=extra)
        assert cut.choices[0].finish_reason == "stop" and words[1] not in cut.choices[0].text
    # the caches and threshold decoding serve a suffix as any request
    for more in ({"cache": "prefix"}, {"cache": "dual"}, {"threshold": 0.5}):
        r = oa.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=10,
                                  extra_body={**extra, **more})
        assert r.choices[0].finish_reason in ("length", "stop")


def test_infill_of_several_gaps(srv: ServerProcess) -> None:
    parts = [{"text": "ROMEO:\n"}, {"gap": 6}, {"text": " soft, what light"}, {"gap": 5}, {"text": " window breaks?"}]
    out = post(f"{srv.url}/generate", {"infill": parts, "seed": 1, "top_logprobs": 2})
    a, b = out["gaps"]
    assert out["text"] == f"ROMEO:\n{a} soft, what light{b} window breaks?"
    assert len(out["logprobs"]) == len(out["tokens"]) and all(len(t["top_logprobs"]) == 2 for t in out["logprobs"])
    positions = [t["position"] for t in out["logprobs"]]
    assert all(p < 6 or p >= 6 + 3 for p in positions)  # the text between the gaps is never generated
    alone = post(f"{srv.url}/generate", {"infill": parts, "seed": 1})
    assert alone["tokens"] == out["tokens"]


BAD = [
    ({"infill": [{"text": "a"}, {"gap": 0}]}, "infill"),
    ({"infill": [{"text": "a"}, {"gap": -3}]}, "infill"),
    ({"infill": [{"text": "only text"}]}, "infill"),
    ({"infill": [{"gap": 2}], "suffix": "x"}, "suffix"),
    ({"infill": [{"gap": 2}], "prompt": "x"}, "prompt"),
    ({"infill": [{"gap": 2}], "max_tokens": 2}, "max_tokens"),
    ({"infill": [{"gap": 60}, {"text": "x"}, {"gap": 10}]}, "infill"),
    ({"prompt": "x", "suffix": "y", "cfg_scale": 1.0}, "cfg_scale"),
    ({"prompt": "x", "suffix": "y", "max_tokens": 4, "steps": 5}, "steps"),
    ({"prompt": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"prompt": "x", "top_logprobs": -1}, "top_logprobs"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_generate_input_names_the_field(srv: ServerProcess, body: dict, param: str) -> None:
    r = httpx.post(f"{srv.url}/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_bad_openai_input_names_the_field(oa: openai.OpenAI) -> None:
    model = oa.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=model, prompt="x", max_tokens=4, logprobs=6)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=model, prompt="x", suffix="y", max_tokens=400)
    assert e.value.body["param"] == "max_tokens"


def test_block_causal_model_refuses_a_suffix(tmp_path: Path) -> None:
    with ServerProcess(ROOT / "models" / "shakespeare-small-bd", "--dtype", "float32", log_dir=tmp_path) as s:
        oa = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        model = oa.models.list().data[0].id
        with pytest.raises(openai.BadRequestError) as e:
            oa.completions.create(model=model, prompt=PREFIX, suffix=SUFFIX, max_tokens=8)
        assert e.value.body["param"] == "suffix" and "bidirectional" in e.value.body["message"]
        r = httpx.post(f"{s.url}/generate", json={"infill": [{"text": "a"}, {"gap": 4}, {"text": "b"}]}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "infill"
        ok = oa.completions.create(model=model, prompt=PREFIX, max_tokens=8, logprobs=1)  # logprobs do work
        assert len(ok.choices[0].logprobs.token_logprobs) == len(ok.choices[0].logprobs.tokens)


def test_the_sdk_sends_suffix_and_infill(srv: ServerProcess) -> None:
    from clients import BadRequest, TZDClient

    with TZDClient(srv.url) as c:
        out = c.generate(infill=[{"text": "ROMEO:\n"}, {"gap": 4}, {"text": " light"}], seed=1, logprobs=True)
        assert out.text == f"ROMEO:\n{out.gaps[0]} light" and len(out.logprobs) == len(out.tokens)
        mid = c.generate(PREFIX, suffix=SUFFIX, max_tokens=6, seed=1)
        assert mid.gaps == [mid.text]
        with pytest.raises(BadRequest) as e:  # checked before anything is sent
            c.generate(infill=[{"gap": 0}])
        assert e.value.param == "infill"


def test_an_empty_prompt_before_a_suffix_is_fine_on_a_bidirectional_model(srv: ServerProcess) -> None:
    out = post(f"{srv.url}/generate", {"prompt": "", "suffix": " window breaks?", "max_tokens": 4, "seed": 2})
    assert out["usage"]["prompt_tokens"] == 0 and len(out["tokens"]) <= 4
    lead = post(f"{srv.url}/generate", {"infill": [{"gap": 4}, {"text": " window breaks?"}], "seed": 2})
    assert lead["tokens"] == out["tokens"] and lead["text"] == out["text"] + " window breaks?"


def test_the_cli_fills_between_prompt_and_suffix(srv: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from clients.__main__ import main

    assert main([PREFIX, "--url", srv.url, "--suffix", SUFFIX, "--max-tokens", "6", "--seed", "1", "--logprobs",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = post(f"{srv.url}/generate", {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 6, "seed": 1})
    assert out["text"] == want["text"] and len(out["logprobs"]) == len(out["tokens"])
