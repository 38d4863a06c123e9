"""The sampler: LLaDA parity, batch invariance, seeds, validation, threshold decoding, KV cache, stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tzd.checkpoint import Loaded, load_checkpoint
from tzd.models import ModelConfig, build_model
from tzd.sampling import DenoiseBatch, SamplingParams, SamplingParamsError, generate, plan

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO.\nBut soft, what light", "KING.\nNow is the", "First Citizen:\nWe are accounted poor citizens,"]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> Loaded:
    return load_checkpoint(tiny_checkpoint, device="cpu", dtype=torch.float32)


def prompts(ckpt: Loaded) -> list[list[int]]:
    return [ckpt.tokenizer.encode(p) for p in PROMPTS]


@torch.no_grad()
def llada_reference(model, prompt: list[int], gen_length: int, steps: int, block_length: int,
                    mask_id: int) -> list[int]:
    """LLaDA's semi-autoregressive low-confidence remasking sampler, written plainly (batch of one)."""
    x = torch.full((1, len(prompt) + gen_length), mask_id, dtype=torch.long)
    x[0, :len(prompt)] = torch.tensor(prompt)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        lo, hi = len(prompt) + b * block_length, len(prompt) + (b + 1) * block_length
        n_masked = int((x[0, lo:hi] == mask_id).sum())
        schedule = [n_masked // steps_per_block + (1 if i < n_masked % steps_per_block else 0)
                    for i in range(steps_per_block)]
        for k in schedule:
            mask_index = x[0] == mask_id
            logits = model(x)[0]
            logits[:, mask_id] = float("-inf")
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits.float(), dim=-1).gather(-1, x0[:, None]).squeeze(-1)
            p[hi:] = float("-inf")
            conf = torch.where(mask_index, p, torch.tensor(float("-inf")))
            chosen = torch.topk(conf, k).indices
            x[0, chosen] = x0[chosen]
    return x[0, len(prompt):].tolist()


@pytest.mark.parametrize("gen,steps,block", [(32, 32, 8), (32, 16, 8), (24, 12, 24), (30, 10, 10)])
def test_llada_parity(ckpt: Loaded, gen: int, steps: int, block: int) -> None:
    for prompt in prompts(ckpt)[:2]:
        expected = llada_reference(ckpt.model, prompt, gen, steps, block, ckpt.mask_id)
        res = generate(ckpt.model, [prompt], SamplingParams(max_tokens=gen, steps=steps, block_length=block),
                       ckpt.mask_id)[0]
        assert res.tokens == expected
        assert res.steps == steps and res.nfe == steps and res.finish_reason == "length"


def test_each_step_commits_per_schedule_and_never_changes_tokens(ckpt: Loaded) -> None:
    seen: dict[int, int] = {}
    counts: list[int] = []

    def on_step(i: int, ev) -> None:
        counts.append(len(ev.committed))
        for pos, tok in ev.committed:
            assert pos not in seen
            seen[pos] = tok
            assert 16 * (ev.step // 4) <= pos < 16 * (ev.step // 4 + 1)  # inside the current block
        for pos, tok in seen.items():
            assert ev.canvas[pos] == tok

    generate(ckpt.model, prompts(ckpt)[:1], SamplingParams(max_tokens=48, steps=12, block_length=16), ckpt.mask_id,
             on_step=on_step)
    assert counts == [4] * 12 and len(seen) == 48


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_invariance_mixed_lengths(ckpt: Loaded, temperature: float) -> None:
    ps = prompts(ckpt)
    params = [SamplingParams(max_tokens=n, steps=n // 2, block_length=8, temperature=temperature, seed=7 + i)
              for i, n in enumerate([16, 32, 24])]
    together = generate(ckpt.model, ps, params, ckpt.mask_id)
    alone = [generate(ckpt.model, [p], pp, ckpt.mask_id)[0] for p, pp in zip(ps, params, strict=True)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    # and when they join a running batch one by one (continuous batching)
    staggered = generate(ckpt.model, ps, params, ckpt.mask_id, max_batch=2)
    assert [r.tokens for r in staggered] == [r.tokens for r in alone]


def test_seeds(ckpt: Loaded) -> None:
    p = prompts(ckpt)[:1]

    def run(seed: int | None) -> list[int]:
        return generate(ckpt.model, p, SamplingParams(max_tokens=24, temperature=1.0, seed=seed),
                        ckpt.mask_id)[0].tokens

    assert run(1) == run(1)
    assert run(1) != run(2)
    first = generate(ckpt.model, p, SamplingParams(max_tokens=24, temperature=1.0), ckpt.mask_id)[0]
    again = generate(ckpt.model, p, SamplingParams(max_tokens=24, temperature=1.0, seed=first.seed), ckpt.mask_id)[0]
    assert again.tokens == first.tokens


def test_top_k_one_is_greedy(ckpt: Loaded) -> None:
    p = prompts(ckpt)[:1]
    greedy = generate(ckpt.model, p, SamplingParams(max_tokens=16), ckpt.mask_id)[0]
    topk1 = generate(ckpt.model, p, SamplingParams(max_tokens=16, temperature=2.0, top_k=1, seed=3), ckpt.mask_id)[0]
    tiny_p = generate(ckpt.model, p, SamplingParams(max_tokens=16, temperature=2.0, top_p=1e-6, seed=3),
                      ckpt.mask_id)[0]
    assert topk1.tokens == greedy.tokens == tiny_p.tokens


def test_random_remasking_and_cfg_run(ckpt: Loaded) -> None:
    p = prompts(ckpt)[:2]
    r = generate(ckpt.model, p, SamplingParams(max_tokens=16, remasking="random", seed=5), ckpt.mask_id)
    assert r[0].tokens == generate(ckpt.model, p[:1], SamplingParams(max_tokens=16, remasking="random", seed=5),
                                   ckpt.mask_id)[0].tokens
    g = generate(ckpt.model, p, SamplingParams(max_tokens=16, steps=8, cfg_scale=1.5), ckpt.mask_id)
    assert all(x.nfe == 16 and len(x.tokens) == 16 for x in g)
    assert ckpt.mask_id not in g[0].tokens + r[0].tokens


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"steps": 0}, "steps"), ({"block_length": 0}, "block_length"),
    ({"temperature": -0.1}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"remasking": "highest"}, "remasking"), ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.2}, "threshold"), ({"cache": "full"}, "cache"), ({"cfg_scale": -1}, "cfg_scale"),
    ({"seed": -1}, "seed"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
    ({"nonsense": 1}, "nonsense"),
])
def test_param_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,field,needle", [
    ({"max_tokens": 90}, "max_tokens", "context of 96"),
    ({"max_tokens": 16, "steps": 17}, "steps", "[1, max_tokens=16]"),
    ({"max_tokens": 16, "block_length": 17}, "block_length", "[1, max_tokens=16]"),
    ({"max_tokens": 32, "block_length": 8, "steps": 3}, "steps", "number of blocks"),
])
def test_plan_checks_against_model(kwargs: dict, field: str, needle: str) -> None:
    with pytest.raises(SamplingParamsError) as e:
        plan(SamplingParams(**kwargs), prompt_len=10, context=96)
    assert e.value.field == field and needle in str(e.value)


def test_uneven_blocks_spread_steps(ckpt: Loaded) -> None:
    """20 tokens in blocks of 8 (8, 8, 4) over 7 steps: 3, 2, 2 steps; every token committed."""
    per_step: list[int] = []
    res = generate(ckpt.model, prompts(ckpt)[:1], SamplingParams(max_tokens=20, steps=7, block_length=8),
                   ckpt.mask_id, on_step=lambda i, ev: per_step.append(len(ev.committed)))[0]
    assert per_step == [3, 3, 2, 4, 4, 2, 2] and res.steps == 7 and len(res.tokens) == 20


@pytest.mark.parametrize("threshold", [0.01, 0.3, 0.9, 1.0])
def test_threshold_commits_at_least_one_within_block(ckpt: Loaded, threshold: float) -> None:
    block = 8

    def on_step(i: int, ev) -> None:
        assert 1 <= len(ev.committed) <= block
        blocks = {pos // block for pos, _ in ev.committed}
        assert len(blocks) == 1

    res = generate(ckpt.model, prompts(ckpt), SamplingParams(max_tokens=32, block_length=block, threshold=threshold),
                   ckpt.mask_id, on_step=on_step)
    for r in res:
        assert len(r.tokens) == 32 and ckpt.mask_id not in r.tokens
        assert 32 // block <= r.nfe <= 32
    if threshold == 0.01:
        assert all(r.nfe < 32 for r in res)  # a low threshold decodes several tokens per step


def test_cache_exact_when_every_block_takes_one_step(ckpt: Loaded) -> None:
    """steps == number of blocks: every step starts a block, so every forward refreshes the cache."""
    ps = prompts(ckpt)
    base = generate(ckpt.model, ps, SamplingParams(max_tokens=32, steps=4, block_length=8), ckpt.mask_id)
    for cache in ("prefix", "dual"):
        got = generate(ckpt.model, ps, SamplingParams(max_tokens=32, steps=4, block_length=8, cache=cache),
                       ckpt.mask_id)
        assert [r.tokens for r in got] == [r.tokens for r in base]


def test_cache_exact_for_one_layer_model(ckpt: Loaded) -> None:
    """With one layer, keys/values depend only on each position's own token, which the cache never
    keeps stale (prefix: committed tokens; dual: masks right of the block), so caching is exact."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=ckpt.tokenizer.vocab_size, n_layer=1, n_head=4, n_embd=64, context_len=96)
    model = build_model(cfg).eval()
    ps = prompts(ckpt)
    for temperature in (0.0, 1.0):
        mk = dict(max_tokens=32, steps=16, block_length=8, temperature=temperature, seed=11)
        base = generate(model, ps, SamplingParams(**mk), ckpt.mask_id)
        for cache in ("prefix", "dual"):
            got = generate(model, ps, SamplingParams(**mk, cache=cache), ckpt.mask_id)
            assert [r.tokens for r in got] == [r.tokens for r in base], cache


def test_cache_single_block_prefix_equals_dual(ckpt: Loaded) -> None:
    """block_length == max_tokens: the refresh happens once, the window is the whole generation and there
    is no suffix, so prefix and dual run the same computation."""
    ps = prompts(ckpt)
    mk = dict(max_tokens=24, steps=12, block_length=24)
    prefix = generate(ckpt.model, ps, SamplingParams(**mk, cache="prefix"), ckpt.mask_id)
    dual = generate(ckpt.model, ps, SamplingParams(**mk, cache="dual"), ckpt.mask_id)
    assert [r.tokens for r in prefix] == [r.tokens for r in dual]
    assert all(len(r.tokens) == 24 and r.nfe == 12 for r in prefix)


def test_cache_stays_close_when_stale(ckpt: Loaded) -> None:
    ps = prompts(ckpt)
    mk = dict(max_tokens=32, steps=32, block_length=8)
    base = generate(ckpt.model, ps, SamplingParams(**mk), ckpt.mask_id)
    for cache in ("prefix", "dual"):
        got = generate(ckpt.model, ps, SamplingParams(**mk, cache=cache), ckpt.mask_id)
        same = sum(a == b for r, q in zip(got, base, strict=True) for a, b in zip(r.tokens, q.tokens, strict=True))
        assert same / (32 * len(ps)) >= 0.5, (cache, same)


def test_mixed_cache_modes_share_a_batch(ckpt: Loaded) -> None:
    ps = prompts(ckpt)
    params = [SamplingParams(max_tokens=16, steps=8, block_length=8, cache=c) for c in ("none", "prefix", "dual")]
    together = generate(ckpt.model, ps, params, ckpt.mask_id)
    alone = [generate(ckpt.model, [p], q, ckpt.mask_id)[0] for p, q in zip(ps, params, strict=True)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]


@pytest.fixture(scope="module")
def default_model() -> Loaded:
    """The shipped model: trained long enough that a misplaced cached key changes its tokens (the tiny
    test checkpoint and random models are too flat to show it)."""
    return load_checkpoint(ROOT / "models" / "shakespeare-small", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_rows_same_tokens_in_consecutive_or_scattered_slots(default_model: Loaded, cache: str) -> None:
    """Cached rows in consecutive slots with one window start write the cache by slicing; scattered
    rows (an uncached request between them) by index. The tokens must not depend on which."""
    m = default_model
    a, b, other = (m.tokenizer.encode(p) for p in PROMPTS)
    a, b = a[:6], b[:6]
    mk = dict(max_tokens=24, steps=24, block_length=8, cache=cache)
    consecutive = generate(m.model, [a, b], SamplingParams(**mk), m.mask_id)
    scattered = generate(m.model, [a, other, b],
                         [SamplingParams(**mk), SamplingParams(max_tokens=24, steps=24), SamplingParams(**mk)],
                         m.mask_id)
    assert [r.tokens for r in consecutive] == [scattered[0].tokens, scattered[2].tokens]


def test_dual_row_beside_a_prefix_row_keeps_its_cached_suffix(ckpt: Loaded) -> None:
    """A mixed batch's query window is as wide as its widest row (prefix: block and after); the
    padding columns of a dual row must not overwrite the keys/values cached for its suffix."""
    ps = prompts(ckpt)[:2]
    batch = DenoiseBatch(ckpt.model, ckpt.mask_id, capacity=2)
    for p, cache in zip(ps, ("prefix", "dual"), strict=True):
        batch.add(p, plan(SamplingParams(max_tokens=32, steps=32, block_length=8, cache=cache), len(p), 96))
    batch.step()  # block start: a full forward records both canvases
    start = len(ps[1])
    suffix = slice(start + 8, start + 32)
    recorded = batch.kv.gather(1, suffix)
    block = batch.kv.gather(1, slice(start, start + 8))[0]
    batch.step()  # cached: the prefix row's window is 32 wide, the dual row's own is 8
    after = batch.kv.gather(1, suffix)
    assert torch.equal(after[0], recorded[0]) and torch.equal(after[1], recorded[1])
    assert not torch.equal(batch.kv.gather(1, slice(start, start + 8))[0], block)  # the block itself was refreshed


def test_eos_and_stop_strings_cut(ckpt: Loaded) -> None:
    tok = ckpt.tokenizer
    p = prompts(ckpt)[:1]
    full = generate(ckpt.model, p, SamplingParams(max_tokens=32), ckpt.mask_id, tokenizer=tok)[0]
    assert full.finish_reason == "length" and full.text == tok.decode(full.tokens)
    # EOS: pretend the 5th generated token is EOS; the result stops before it
    eos = full.tokens[4]
    cut = generate(ckpt.model, p, SamplingParams(max_tokens=32), ckpt.mask_id, eos_id=eos, tokenizer=tok)[0]
    assert cut.finish_reason == "stop" and eos not in cut.tokens and cut.tokens == full.tokens[:full.tokens.index(eos)]
    # a stop string taken from the middle of the text
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    s = generate(ckpt.model, p, SamplingParams(max_tokens=32, stop=[stop]), ckpt.mask_id, tokenizer=tok)[0]
    assert s.finish_reason == "stop" and s.text == full.text[:full.text.find(stop)]
    assert tok.decode(s.tokens).startswith(s.text)


def test_batch_capacity_and_cancel(ckpt: Loaded) -> None:
    batch = DenoiseBatch(ckpt.model, ckpt.mask_id, capacity=2)
    ps = prompts(ckpt)
    handles = [object(), object()]
    for p, h in zip(ps, handles, strict=False):
        batch.add(p, plan(SamplingParams(max_tokens=8), len(p), 96), h)
    assert batch.free_slots == 0
    assert batch.remove(handles[0]) and not batch.remove(handles[0])
    events = batch.step()
    assert [e.handle for e in events] == [handles[1]]


