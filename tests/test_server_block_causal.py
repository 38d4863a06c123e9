"""The real server on a block-causal checkpoint: the exact cache, prefix reuse across requests, its metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from tests.server_utils import ServerProcess, metrics
from tzd.checkpoint import load_checkpoint, save_checkpoint
from tzd.models import ModelConfig, build_model
from tzd.sampling import SamplingParams, generate

ROOT = Path(__file__).resolve().parents[1]
SHARED = "SYSTEM: You speak as the characters of Shakespeare do, in verse, briefly and well.\n" * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bd")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, n_layer=2, n_head=2, n_embd=32, context_len=256, attention="block_causal",
                      diffusion_block=8)
    path = save_checkpoint(root / "model", build_model(cfg), cfg, ROOT / "models/shakespeare-small/tokenizer.model")
    with ServerProcess(path, "--dtype", "float32", "--max-batch-size", "4", "--prefix-cache-mb", "4",
                       log_dir=root) as srv:
        yield path, srv


def test_block_causal_server(server) -> None:
    path, srv = server
    L = load_checkpoint(path, device="cpu", dtype=torch.float32)
    with httpx.Client(timeout=60) as c:
        health = c.get(f"{srv.url}/health").json()
        assert health["attention"] == "block_causal"
        [card] = c.get(f"{srv.url}/v1/models").json()["data"]
        assert card["attention"] == "block_causal" and card["diffusion_block"] == 8

        bad = c.post(f"{srv.url}/generate", json={"prompt": "ROMEO:", "max_tokens": 16, "block_length": 4})
        assert bad.status_code == 400 and "block_length" in bad.text and "diffusion_block" in bad.text

        before = metrics(srv.url)
        texts = []
        for who in ("ROMEO:", "JULIET:", "HAMLET:"):
            body = {"prompt": SHARED + who, "max_tokens": 16, "steps": 8, "cache": "dual", "seed": 1}
            r = c.post(f"{srv.url}/generate", json=body)
            assert r.status_code == 200, r.text
            ids = L.tokenizer.encode(SHARED + who)
            # the exact cache with the pool gives the tokens of the whole canvas through the model each step
            [want] = generate(L.model, [ids], SamplingParams(max_tokens=16, steps=8, cache="none", seed=1),
                              L.mask_id, eos_id=L.tokenizer.eos_ids)
            assert r.json()["tokens"] == want.tokens
            texts.append(r.json()["text"])
        after = metrics(srv.url)
    blocks = len(L.tokenizer.encode(SHARED)) // 8  # full blocks of the shared part (at least)
    queries = after["tzd_prefix_cache_queries_total"] - before.get("tzd_prefix_cache_queries_total", 0)
    hits = after["tzd_prefix_cache_hits_total"] - before.get("tzd_prefix_cache_hits_total", 0)
    assert queries >= 3 * blocks and hits >= 2 * blocks  # the second and third found the shared blocks
    assert 0 < after["tzd_prefix_cache_bytes"] <= 4 << 20
