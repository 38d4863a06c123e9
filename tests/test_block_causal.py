"""Block-causal attention (block diffusion): a position sees its own block and every earlier one."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from tzd.models import ForwardContext, ModelConfig, build_model
from tzd.models.blocks import block_ids, two_stream_mask
from tzd.sampling.step_plan import plan_step

BACKENDS = ["smdm", "litgpt"]


def tiny(backend: str, **kw) -> ModelConfig:
    return ModelConfig(backend=backend, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       context_len=32, attention="block_causal", diffusion_block=4, **kw)


def test_block_ids_prompt_is_its_own_span() -> None:
    # prompt of 6 with blocks of 4: prompt blocks [0..3] [4,5], generated blocks from position 6
    ids = block_ids(14, torch.tensor([6, 0, 8]), 4)
    assert ids[0].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert ids[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert ids[2].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]


def test_config_checks_attention_kind() -> None:
    with pytest.raises(ValueError, match="model.attention"):
        ModelConfig(attention="sliding")
    with pytest.raises(ValueError, match="model.diffusion_block"):
        ModelConfig(attention="block_causal", diffusion_block=0)
    with pytest.raises(ValueError, match="block_causal"):
        ModelConfig(attention="block_causal", causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_later_blocks_never_change_earlier_logits(backend: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(backend)).eval()
    ids = torch.randint(0, 96, (2, 16))
    for b in range(3):  # change a token in block b + 1: blocks <= b keep every logit
        changed = ids.clone()
        changed[:, 4 * (b + 1) + 1] = (ids[:, 4 * (b + 1) + 1] + 1) % 96
        a, c = model(ids), model(changed)
        assert torch.equal(a[:, :4 * (b + 1)], c[:, :4 * (b + 1)])
        assert (a[:, 4 * (b + 1):4 * (b + 2)] - c[:, 4 * (b + 1):4 * (b + 2)]).abs().max() > 1e-4
    changed = ids.clone()  # inside a block both directions: the last token moves the block's first logit
    changed[:, 7] = (ids[:, 7] + 1) % 96
    assert (model(ids)[:, 4] - model(changed)[:, 4]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_serving_layout_matches_explicit_mask(backend: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(backend)).eval()
    ids = torch.randint(0, 96, (2, 15))
    blocks = block_ids(15, torch.tensor([6, 3]), 4)
    mask = blocks[:, None, None, :] <= blocks[:, None, :, None]
    a = model(ids, ForwardContext(block_ids=blocks))
    b = model(ids, ForwardContext(attn_mask=mask))
    assert torch.allclose(a, b, atol=1e-6)
    bidir = build_model(ModelConfig(**{**tiny(backend).to_dict(), "attention": "bidirectional"})).eval()
    bidir.load_state_dict(model.state_dict())
    assert (bidir(ids) - a).abs().max() > 1e-4  # the mask is applied


def test_reference_block_ids_equal_dense_mask_with_padding() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    kb = block_ids(11, torch.tensor([5, 2]), 3)
    qb = kb[:, 2:]
    seqlens = torch.tensor([11, 9])
    got = reference.attention(q, k, v, seqlens, q_blocks=qb, k_blocks=kb)
    keep = (kb[:, None, None, :] <= qb[:, None, :, None]) & (torch.arange(11)[None, :] < seqlens[:, None])[:, None,
                                                                                                           None]
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kr.mT / 4).masked_fill(~keep, float("-inf"))
    assert torch.allclose(got, scores.softmax(-1) @ vr, atol=1e-5)


def test_two_stream_mask_layout() -> None:
    blocks = block_ids(8, 0, 4)  # two blocks of four
    m = two_stream_mask(blocks)[0, 0]
    T = 8
    noised, clean = slice(0, T), slice(T, 2 * T)
    assert m[noised, noised][0].tolist() == [True] * 4 + [False] * 4  # its own noised block only
    assert m[noised, clean][0].tolist() == [False] * 8  # block 0 has no clean context
    assert m[noised, clean][5].tolist() == [True] * 4 + [False] * 4  # block 1 sees clean block 0
    assert not m[clean, noised].any()
    assert m[clean, clean][5].tolist() == [True] * 8


# ---- sampling a block-causal model: the exact cache -----------------------------------------------------

def sampler_model(backend: str = "smdm", block: int = 8) -> torch.nn.Module:
    """A random block-causal model with spread-out logits (near-uniform ones would make argmax ties)."""
    torch.manual_seed(1)
    cfg = ModelConfig(backend=backend, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_len=96,
                      attention="block_causal", diffusion_block=block)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model


MIXED = [  # (prompt length, params): lengths not multiples of the block, uneven last blocks, threshold
    (5, dict(max_tokens=24, steps=12)),
    (13, dict(max_tokens=20, steps=20)),
    (8, dict(max_tokens=16, steps=6, threshold=0.4)),
    (1, dict(max_tokens=30, steps=10, temperature=1.0, seed=3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_exact_cache_equals_uncached_block_causal_sampler(backend: str, cache: str) -> None:
    from tzd.sampling import SamplingParams, generate  # noqa: PLC0415

    model = sampler_model(backend)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n, _ in MIXED]
    uncached = generate(model, prompts, [SamplingParams(**p, cache="none") for _, p in MIXED], mask_id=96)
    cached = generate(model, prompts, [SamplingParams(**p, cache=cache) for _, p in MIXED], mask_id=96)
    alone = [generate(model, [pr], SamplingParams(**p, cache=cache), mask_id=96)[0]
             for pr, (_, p) in zip(prompts, MIXED, strict=True)]
    for u, c, a in zip(uncached, cached, alone, strict=True):
        assert c.tokens == u.tokens  # exact: the same tokens as the whole canvas through the model each step
        assert a.tokens == c.tokens  # batch invariance
        assert c.nfe == u.nfe == c.steps


def test_block_causal_plan_uses_the_model_blocks() -> None:
    from tzd.sampling import SamplingParams, SamplingParamsError, plan  # noqa: PLC0415

    p = plan(SamplingParams(max_tokens=40), 3, 96, model_block=8)
    assert p.block_length == 8 and p.num_blocks == 5
    assert plan(SamplingParams(max_tokens=5), 3, 96, model_block=8).block_length == 5
    with pytest.raises(SamplingParamsError, match="diffusion_block") as e:
        plan(SamplingParams(max_tokens=40, block_length=16), 3, 96, model_block=8)
    assert e.value.field == "block_length"


@pytest.mark.parametrize("page_size", [16, 8, 4])  # a block of 8 in a page of 16 is copied; 8 and 4 share pages
def test_prefix_pool_reuses_shared_prompt_blocks_exactly(page_size: int) -> None:
    from tzd.sampling import DenoiseBatch, SamplingParams, plan  # noqa: PLC0415

    model = sampler_model()
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 96, (27,), generator=g).tolist()  # three full blocks of 8 and a partial one
    prompts = [shared + torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 0, 9, 14)]
    params = [SamplingParams(max_tokens=16, steps=8, cache="dual", seed=i) for i in range(4)]

    def run(pool_bytes: int, together: bool) -> tuple[list[list[int]], DenoiseBatch, list[int]]:
        batch = DenoiseBatch(model, 96, capacity=4, prefix_pool_bytes=pool_bytes, kv_page_size=page_size)
        out: dict[int, list[int]] = {}
        columns: list[int] = []
        pending = list(range(4))
        while pending or len(batch):
            while pending and (together or not len(batch)):
                i = pending.pop(0)
                batch.add(prompts[i], plan(params[i], len(prompts[i]), 96, model_block=8), handle=i)
            if batch.pool is not None and batch.pool.shares_pages:  # each started row: its first three blocks' pages
                for row, s in enumerate(batch.slots):
                    if s is not None and s.pooled >= 3 and s.waits_for is None:
                        leading[s.handle] = tuple(batch.kv.held(row, 0, 3 * 8 // page_size))
            windows = [s.window()[1] for s in batch.slots if s is not None and s.waits_for is None]
            columns.append(sum(windows))
            for ev in batch.step():
                if ev.done:
                    out[ev.handle] = ev.canvas.tolist()
        return [out[i] for i in range(4)], batch, columns

    leading: dict[int, tuple[int, ...]] = {}
    without, _, cols_without = run(0, together=True)
    for together in (True, False):
        leading.clear()
        with_pool, batch, cols = run(1 << 20, together)
        assert with_pool == without  # exact by construction
        kv = batch.kv
        if page_size <= 8:  # no copies: the pool holds pages of the store, and the rows used them in place
            pooled = sorted(p for pages in batch.pool.entries.values() for p in pages)
            assert all(isinstance(e, list) for e in batch.pool.entries.values())
            assert len(leading) == 4 and len(set(leading.values())) == 1  # every row read the same pages
            assert set(leading[0]) <= set(pooled)
            assert (kv.refs[pooled] == 1).all() and kv.free_pages + len(pooled) == kv.num_pages  # rows let go
        else:
            assert all(isinstance(e, tuple) for e in batch.pool.entries.values()) and kv.free_pages == kv.num_pages
        stats = batch.pool.stats
        # full prompt blocks: 3, 3, 4, 5; the first request computes the three shared ones, the others find them
        assert stats.queries == 15 and stats.hits == 3 * 3
        assert len(batch.pool.entries) == 3 + 1 + 2  # the shared blocks and the longer prompts' own
        assert sum(cols) < sum(cols_without) - 3 * 3 * 8 + 1  # the others never ran the shared blocks' columns
    block_bytes = 2 * 2 * 2 * 8 * 16 * 4  # k and v, 2 layers, 2 kv heads, 8 positions, head dim 16, fp32
    tiny_pool, batch, _ = run(block_bytes + 100, together=False)  # room for one block: LRU eviction
    assert tiny_pool == without and len(batch.pool.entries) == 1
    assert batch.pool.bytes <= batch.pool.capacity


def test_pooled_pages_go_back_to_requests_when_the_store_runs_short() -> None:
    """The pool's pages come out of the KV store: when a request needs them they are reclaimed (least
    recently used blocks first), never a MemoryError while the pool holds pages nobody else uses."""
    from tzd.sampling import DenoiseBatch, SamplingParams, plan  # noqa: PLC0415
    from tzd.sampling.batch import kv_shape  # noqa: PLC0415
    from tzd.sampling.kv_pages import PagedKVStore  # noqa: PLC0415

    model = sampler_model()
    page = PagedKVStore.page_bytes(*kv_shape(model.tzd_config), 8, torch.float32)
    batch = DenoiseBatch(model, 96, capacity=1, prefix_pool_bytes=1 << 20, kv_page_size=8, kv_cache_bytes=6 * page)
    g = torch.Generator().manual_seed(2)

    def run(prompt: list[int]) -> None:
        batch.add(prompt, plan(SamplingParams(max_tokens=16, steps=4, cache="dual"), len(prompt), 96, model_block=8))
        while len(batch):
            batch.step()

    run(torch.randint(0, 96, (32,), generator=g).tolist())  # 6 pages; its 4 prompt blocks stay in the pool
    assert len(batch.pool.entries) == 4 and batch.kv.free_pages == 2
    run(torch.randint(0, 96, (32,), generator=g).tolist())  # another prompt: all 6 pages, the pool's 4 too
    assert batch.kv.free_pages + sum(len(p) for p in batch.pool.entries.values()) == 6
    assert (batch.kv.refs >= 0).all() and batch.kv.refs.sum() == len(batch.pool.entries)


@pytest.mark.parametrize("block_causal", [False, True])
def test_packed_rows_equal_padded_rows(block_causal: bool) -> None:
    """A step over rows of different lengths packs their tokens (varlen) instead of padding them: the same
    logits as the padded forward, classifier-free guidance copies and the approximate cache's record too."""
    from tzd.sampling import DenoiseBatch, SamplingParams, plan  # noqa: PLC0415

    model = sampler_model() if block_causal else build_model(ModelConfig(
        vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_len=96)).eval()
    block = 8 if block_causal else None
    g = torch.Generator().manual_seed(2)
    batch = DenoiseBatch(model, 96, capacity=3)
    params = [SamplingParams(max_tokens=16, steps=16, cfg_scale=1.5), SamplingParams(max_tokens=24, cache="dual"),
              SamplingParams(max_tokens=16)]
    for n, p in zip((5, 11, 30), params, strict=True):
        prompt = torch.randint(0, 96, (n,), generator=g).tolist()
        batch.add(prompt, plan(p, n, 96, block), handle=n)
    step = plan_step(batch.table, [0, 1, 2], batch.shift, batch.context, batch.device)
    rv, slots = step.values, step.slots  # every row through both whole-canvas paths (a cached one too)
    with torch.inference_mode():
        packed = batch.runner.packed_logits(rv, slots)
        # a block-causal cache is exact: no record
        recorded = None if block_causal else batch.kv.gather(1, slice(0, 35))[0]
        if recorded is not None:
            batch.kv.k.zero_()
        padded = batch.runner.padded_logits(rv, slots)
    assert packed.shape == padded.shape and packed.shape[0] == 3
    assert torch.allclose(packed, padded, atol=1e-4)  # padding past a row's length is masked: same logits
    if recorded is not None:
        assert (recorded - batch.kv.gather(1, slice(0, 35))[0]).abs().max() < 1e-5  # the dual row's record
        assert recorded.abs().sum() > 0
