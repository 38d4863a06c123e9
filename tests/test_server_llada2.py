"""The real server on a LLaDA2.0 directory (mixture of experts, block diffusion, in its published layout):
greedy tokens through /generate's messages and /v1/chat/completions equal the sampler's, with the exact
block cache; /health and /v1/models report the experts and the active parameters."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.hf_checkpoints import write_llada2
from tests.server_utils import ServerProcess
from tzd.checkpoint import load_checkpoint
from tzd.models import count_params
from tzd.sampling import SamplingParams, generate

pytest.importorskip("tokenizers")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("llada2")
    path = write_llada2(root / "model")
    with ServerProcess(path, "--dtype", "float32", "--max-batch-size", "4", "--max-tokens-limit", "48",
                       log_dir=root) as srv:
        yield path, srv


def test_size_in_health_and_models(served) -> None:
    path, srv = served
    L = load_checkpoint(path, device="cpu")
    total = count_params(L.model)
    active = total - 2 * (8 - 3) * 3 * 32 * 16  # two MoE layers; a token skips 5 of 8 experts of 3 [16, 32] matrices
    health = httpx.get(f"{srv.url}/health", timeout=30).json()
    assert (health["parameters"], health["active_parameters"]) == (total, active)
    assert (health["experts"], health["experts_per_token"]) == (8, 3)
    [card] = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"]
    assert card["attention"] == "block_causal" and card["diffusion_block"] == 32
    assert (card["experts"], card["active_parameters"]) == (8, active)


def test_greedy_tokens_through_the_chat_routes(served) -> None:
    path, srv = served
    L = load_checkpoint(path, device="cpu")
    chat_ids = L.tokenizer.encode_chat(L.tokenizer.chat.render(MESSAGES))
    params = SamplingParams(max_tokens=40, steps=40)
    [want] = generate(L.model, [chat_ids], params, L.mask_id, eos_id=L.tokenizer.eos_ids, tokenizer=L.tokenizer)
    [uncached] = generate(L.model, [chat_ids], params.model_copy(update={"cache": "none"}), L.mask_id,
                          eos_id=L.tokenizer.eos_ids, tokenizer=L.tokenizer)
    assert want.tokens == uncached.tokens  # whatever the server's default cache, the tokens are these
    with httpx.Client(timeout=120) as c:
        r = c.post(f"{srv.url}/generate", json={"messages": MESSAGES, "max_tokens": 40, "steps": 40})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == want.tokens and r.json()["usage"]["prompt_tokens"] == len(chat_ids)
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    [model] = [m.id for m in oa.models.list()]
    done = oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, temperature=0,
                                      extra_body={"steps": 40})
    assert done.choices[0].message.content == want.text


def test_stream_shows_max_tokens_of_the_run_on_canvas(served) -> None:
    """LLaDA2's rule denoises on to the end of the last block; a stream shows only the max_tokens asked for:
    each position committed once, none past them, and the masked count of those alone."""
    import json

    from tests.server_utils import sse_events

    path, srv = served
    L = load_checkpoint(path, device="cpu")
    fields = {"max_tokens": 20, "steps": 8, "seed": 1}
    ids = L.tokenizer.encode("To be")
    [want] = generate(L.model, [ids], SamplingParams(**fields), L.mask_id, eos_id=L.tokenizer.eos_ids)
    body = {"prompt": "To be", **fields, "stream": True}
    with httpx.stream("POST", f"{srv.url}/generate", json=body, timeout=120) as r:
        events = [(e, json.loads(d)) for e, d in sse_events(r)]
    steps = [d for e, d in events if e == "step"]
    done = events[-1][1]
    positions = [c["position"] for s in steps for c in s["committed"]]
    assert len(positions) == len(set(positions)) and all(p < 20 for p in positions)
    assert steps[-1]["masked"] == 0 and all(s["masked"] <= 20 for s in steps)
    assert done["tokens"] == want.tokens and len(done["tokens"]) <= 20
