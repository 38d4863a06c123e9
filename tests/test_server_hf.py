"""The real server on LLaDA and Dream directories in their Hugging Face layout: /generate (prompt and
messages), /v1/completions and /v1/chat/completions through the official openai client, streamed and not."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.hf_checkpoints import write_dream, write_llada
from tests.server_utils import ServerProcess, stream_generate
from tzd.checkpoint import load_checkpoint
from tzd.sampling import SamplingParams, generate

pytest.importorskip("transformers")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not?"}]
EXTRA = {"steps": 8, "block_length": 8}


@pytest.fixture(scope="module", params=["llada", "dream"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    path = (write_llada if request.param == "llada" else write_dream)(root / "model")
    with ServerProcess(path, "--dtype", "float32", "--max-batch-size", "4", "--max-tokens-limit", "32",
                       log_dir=root) as srv:
        yield request.param, path, srv


def test_generate_with_prompt_and_messages(family) -> None:
    _, path, srv = family
    L = load_checkpoint(path, device="cpu")
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{srv.url}/generate", json={"prompt": "To be, or", "max_tokens": 16, **EXTRA})
        assert r.status_code == 200, r.text
        ids = L.tokenizer.encode("To be, or")
        [want] = generate(L.model, [ids], SamplingParams(max_tokens=16, **EXTRA), L.mask_id, eos_id=L.tokenizer.eos_ids,
                          tokenizer=L.tokenizer)
        assert r.json()["tokens"] == want.tokens and r.json()["usage"]["prompt_tokens"] == len(ids)

        r = c.post(f"{srv.url}/generate", json={"messages": MESSAGES, "max_tokens": 16, **EXTRA})
        assert r.status_code == 200, r.text
        chat_ids = L.tokenizer.encode_chat(L.tokenizer.chat.render(MESSAGES))
        assert r.json()["usage"]["prompt_tokens"] == len(chat_ids)
        [want] = generate(L.model, [chat_ids], SamplingParams(max_tokens=16, **EXTRA), L.mask_id,
                          eos_id=L.tokenizer.eos_ids, tokenizer=L.tokenizer)
        assert r.json()["text"] == want.text

        events = stream_generate(c, srv.url, {"messages": MESSAGES, "max_tokens": 16, **EXTRA})
        assert events[-1][0] == "done" and events[-1][1]["text"] == want.text

        both = c.post(f"{srv.url}/generate", json={"prompt": "x", "messages": MESSAGES})
        assert both.status_code == 400 and "exactly one of prompt and messages" in both.text


def test_openai_chat_and_completions(family) -> None:
    kind, path, srv = family
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    [model] = [m.id for m in oa.models.list()]
    r = oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, seed=3, n=2, extra_body=EXTRA)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: the n choices agree
    native = httpx.post(f"{srv.url}/generate", json={"messages": MESSAGES, "max_tokens": 16, **EXTRA},
                        timeout=60).json()
    assert r.choices[0].message.content == native["text"]
    assert r.choices[0].finish_reason == native["finish_reason"]
    assert r.usage.prompt_tokens == native["usage"]["prompt_tokens"]  # counted once for n = 2
    assert r.usage.completion_tokens == 2 * native["usage"]["completion_tokens"]

    stream = oa.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=16, stream=True,
                                        stream_options={"include_usage": True}, extra_body=EXTRA)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    assert text == native["text"]
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason][-1] == native["finish_reason"]
    assert chunks[-1].usage.completion_tokens == native["usage"]["completion_tokens"]

    done = oa.completions.create(model=model, prompt="To be, or", max_tokens=16, extra_body=EXTRA)
    assert done.choices[0].text == httpx.post(f"{srv.url}/generate", json={"prompt": "To be, or", "max_tokens": 16,
                                                                           **EXTRA}, timeout=60).json()["text"]
    scored = oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=2,
                                        extra_body=EXTRA)
    content = scored.choices[0].logprobs.content
    assert "".join(t.token for t in content) == scored.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    streamed = list(oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, logprobs=True,
                                               stream=True, extra_body=EXTRA))
    last = [c for ch in streamed for c in ch.choices if c.finish_reason][-1]
    assert [t.logprob for t in last.logprobs.content] == [t.logprob for t in content]  # whole, on the last chunk
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=model, messages=[], max_tokens=8)
    assert e.value.body["param"] == "messages"


def test_model_without_chat_template_names_messages(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", log_dir=tmp_path) as srv:
        oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model=oa.models.list().data[0].id, messages=MESSAGES, max_tokens=8)
        assert e.value.body["param"] == "messages" and "chat template" in e.value.body["message"]
        r = httpx.post(f"{srv.url}/generate", json={"messages": MESSAGES}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_sdk_chat_and_messages(family) -> None:
    from clients import AsyncTZDClient, BadRequest, Completion, TZDClient

    _, _, srv = family
    native = httpx.post(f"{srv.url}/generate", json={"messages": MESSAGES, "max_tokens": 16, **EXTRA},
                        timeout=60).json()
    with TZDClient(srv.url) as client:
        done = client.generate(messages=MESSAGES, max_tokens=16, **EXTRA)
        assert done.text == native["text"]
        events = list(client.stream(messages=MESSAGES, max_tokens=16, **EXTRA))
        assert isinstance(events[-1], Completion) and events[-1].text == native["text"]
        chat = client.chat(MESSAGES, max_completion_tokens=16, n=2, **EXTRA)
        assert [c.message.content for c in chat.choices] == [native["text"]] * 2
        assert chat.usage.prompt_tokens == native["usage"]["prompt_tokens"]
        with pytest.raises(BadRequest) as e:
            client.chat([], max_tokens=4)
        assert e.value.param == "messages"

    async def run() -> str:
        async with AsyncTZDClient(srv.url) as client:
            return (await client.chat(MESSAGES, max_tokens=16, **EXTRA)).choices[0].message.content

    import asyncio

    assert asyncio.run(run()) == native["text"]
