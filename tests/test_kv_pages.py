"""The paged KV cache: page-table reads and writes against a dense store, allocation and scratch isolation,
the strided fast path against the gather, and a DenoiseBatch whose requests wait for pages (same tokens
as with pages to spare; one larger than the whole cache is refused)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tzd.models import ModelConfig, build_model
from tzd.sampling import DenoiseBatch, SamplingParams, generate, plan
from tzd.sampling.kv_pages import PagedKVStore

LAYERS, HK, D, CONTEXT, PAGE = 2, 2, 4, 40, 8


def store(pages: int, capacity: int = 4) -> PagedKVStore:
    s = PagedKVStore(capacity, LAYERS, HK, D, CONTEXT, PAGE, pages, torch.device("cpu"))
    s.ensure(torch.float32)
    return s


def test_page_table_reads_and_writes_match_a_dense_store() -> None:
    """Random joins and leaves fragment the pool; every write through the table lands where a dense
    [slots, layers, Hk, context, D] store puts it, and every read gives it back (gather and strided)."""
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    kv = store(pages=14)
    dense_k = torch.zeros(4, LAYERS, HK, CONTEXT, D)
    dense_v = torch.zeros_like(dense_k)
    lengths = [0] * 4
    for _ in range(60):
        slot = rng.randrange(4)
        if rng.random() < 0.3 or lengths[slot] == 0:  # (re)join with a fresh length, when pages allow
            kv.release(slot)
            n = rng.randint(1, CONTEXT)
            if kv.pages_for(n) > kv.free_pages:
                lengths[slot] = 0
                continue
            kv.allocate(slot, n)
            lengths[slot] = n
            dense_k[slot] = dense_v[slot] = 0
            kv.scatter(slot, 0, dense_k[slot, :, :, :n], dense_v[slot, :, :, :n])
        rows = [s for s in range(4) if lengths[s]]
        keys = min(lengths[s] for s in rows)
        T = rng.randint(1, keys)
        pos = torch.stack([torch.randperm(keys, generator=g)[:T] for _ in rows])
        layer = rng.randrange(LAYERS)
        k, v = torch.randn(len(rows), HK, T, D, generator=g), torch.randn(len(rows), HK, T, D, generator=g)
        slots = torch.tensor(rows)
        kv.write(layer, kv.flat(slots, pos), k, v)
        for i, s in enumerate(rows):
            dense_k[s, layer, :, pos[i]] = k[i]
            dense_v[s, layer, :, pos[i]] = v[i]
        read_k, read_v = kv.read(layer, kv.flat(slots, torch.arange(keys).expand(len(rows), -1)))
        assert (torch.equal(read_k, dense_k[rows, layer, :, :keys])
                and torch.equal(read_v, dense_v[rows, layer, :, :keys]))
        strided = kv.strided_rows(np.array(rows), keys)
        if strided is not None:
            sk, sv = kv.read_strided(layer, len(rows), *strided, keys)
            assert torch.equal(sk, read_k) and torch.equal(sv, read_v)
        for s in rows:
            gk, gv = kv.gather(s, slice(0, lengths[s]))
            assert torch.equal(gk, dense_k[s, :, :, :lengths[s]]) and torch.equal(gv, dense_v[s, :, :, :lengths[s]])
    assert kv.free_pages + sum(kv.pages_for(n) for n in lengths if n) == 14


def test_allocation_usage_and_scratch_isolation() -> None:
    kv = store(pages=6)
    kv.allocate(0, 17)  # 3 pages
    assert kv.free_pages == 3 and kv.usage == pytest.approx(0.5)
    with pytest.raises(MemoryError, match="need 4 KV pages; 3 of 6 are free"):
        kv.allocate(1, 32)
    kv.write(0, kv.flat(torch.tensor([0]), torch.arange(17)[None]), torch.ones(1, HK, 17, D), torch.ones(1, HK, 17, D))
    before = kv.gather(0, slice(0, 17))[0].clone()
    kv.allocate(1, 0)  # a request without the cache: no pages, every entry scratch
    everywhere = torch.arange(CONTEXT)[None]
    kv.write(1, kv.flat(torch.tensor([1]), everywhere), torch.full((1, HK, CONTEXT, D), 7.0),
             torch.full((1, HK, CONTEXT, D), 7.0))
    assert torch.equal(kv.gather(0, slice(0, 17))[0], before)  # slot 0's pages untouched
    assert kv.strided_rows(np.array([1]), 8) is None  # no pages: never a view
    kv.release(0)
    assert kv.free_pages == 6 and kv.usage == 0.0
    assert (kv.host_table[0] == kv.num_pages).all()  # a left slot points at scratch again


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=61, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, context_len=80)).eval()


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_requests_wait_for_pages_with_the_same_tokens(cache: str) -> None:
    """A cache of 9 pages of 16 positions: six requests whose canvases take 3 or 4 pages run at most three
    at a time, joining in order as pages free up, and get the tokens that a cache with room for all of
    them gives."""
    model, g = small_model(), torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 60, (n,), generator=g).tolist() for n in (8, 20, 13, 30, 5, 17)]
    params = [SamplingParams(max_tokens=32, steps=16, block_length=16, cache=cache, seed=i) for i in range(6)]
    page_bytes = PagedKVStore.page_bytes(2, 1, 16, 16, torch.float32)
    assert DenoiseBatch(model, 60, capacity=6, kv_cache_bytes=9 * page_bytes).kv.num_pages == 9
    roomy = generate(model, prompts, params, 60)
    started: set[int] = set()
    done: set[int] = set()
    most = 0

    def on_step(i: int, ev) -> None:  # noqa: ANN001
        nonlocal most
        started.add(i)
        done.update([i] if ev.done else [])
        most = max(most, len(started - done))

    tight = generate(model, prompts, params, 60, on_step=on_step, kv_cache_bytes=9 * page_bytes)
    assert [r.tokens for r in tight] == [r.tokens for r in roomy]
    assert 2 <= most <= 3  # the pages, not the six slots, bounded the batch


def test_request_larger_than_the_whole_cache_is_refused() -> None:
    model = small_model()
    batch = DenoiseBatch(model, 60, capacity=2, kv_cache_bytes=2 * PagedKVStore.page_bytes(2, 1, 16, 16, torch.float32))
    p = plan(SamplingParams(max_tokens=40, cache="dual"), 10, 80)
    with pytest.raises(ValueError, match="needs 4 KV pages of 16; the whole cache has 2"):
        batch.add([1] * 10, p)
    uncached = plan(SamplingParams(max_tokens=40), 10, 80)  # no cache: no pages
    batch.check_fits(uncached)  # no cache: it fits (no raise)
    batch.add([1] * 10, uncached)
    assert batch.kv.free_pages == 2
