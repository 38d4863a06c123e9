"""The entropy-bounded sampler (entropy_bound) and early exit (early_exit) against plain reference loops
written here: token for token alone and batched beside other params, with the caches, block-causal too;
early exit ends where LLaDA's loop (whole canvas) and dInfer's rule (a finished block holding an EOS)
give the same tokens, and counts the forwards it saved."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tzd.checkpoint import Loaded, load_checkpoint
from tzd.models import ForwardContext, ModelConfig, build_model
from tzd.models.blocks import block_ids
from tzd.models.invariant import set_batch_invariant
from tzd.sampling import SamplingParams, generate, plan, rng
from tzd.sampling.rules import entropy, select_commits

ROOT = Path(__file__).resolve().parents[1]
V, MASK = 97, 96


# ---- the reference: LLaDA's loop with the commit rules written out, a batch of one --------------------

@torch.no_grad()
def reference(model: torch.nn.Module, prompt: list[int], p: SamplingParams, mask_id: int,
              model_block: int | None = None, eos: tuple[int, ...] = (), exit_rule: str | None = None
              ) -> tuple[list[int], int, list[int]]:
    """(generated canvas, forwards, tokens committed per step). The whole canvas through the model every
    step. `exit_rule`: None denoises every position; "prefix" stops once an EOS is in the committed left
    part; "dinfer" once a fully committed block holds an EOS (the rest is then EOS)."""
    L, g, steps = len(prompt), p.max_tokens, p.resolved_steps()
    block = min(model_block, g) if model_block else p.resolved_block_length()
    n_blocks = math.ceil(g / block)
    x = torch.tensor([prompt + [mask_id] * g])
    blocks = block_ids(L + g, L, model_block) if model_block else None
    step, counts = 0, []
    for b in range(n_blocks):
        lo, hi = L + b * block, min(L + (b + 1) * block, L + g)
        budget = min(steps // n_blocks + (1 if b < steps % n_blocks else 0), hi - lo)
        for k in range(budget):
            masked = [i for i in range(lo, hi) if int(x[0, i]) == mask_id]
            if not masked:
                break
            logits = model(x, ForwardContext(block_ids=blocks))[0].float()
            logits[:, mask_id] = float("-inf")
            probs = torch.softmax(logits, dim=-1)
            if p.temperature > 0:  # the sampler's counter-based Gumbel noise, keyed by (seed, step, position)
                key = rng.keys(torch.tensor([p.seed]), torch.tensor([step]), torch.arange(L + g)[None],
                               rng.STREAM_GUMBEL)
                noisy = logits.double() / p.temperature + rng.gumbel(key, logits.shape[-1])[0]
                x0 = noisy.argmax(dim=-1)
            else:
                x0 = logits.argmax(dim=-1)
            conf = {i: float(probs[i, x0[i]]) for i in masked}
            if p.remasking == "random":  # the sampler's seeded uniform noise in place of the confidence
                u = rng.uniform(rng.keys(torch.tensor([p.seed]), torch.tensor([step]), torch.arange(L + g)[None],
                                         rng.STREAM_REMASK))[0].float()
                conf = {i: float(u[i]) for i in masked}
            order = sorted(masked, key=lambda i: -conf[i])  # stable: ties in position order
            n = math.ceil(len(masked) / (budget - k))  # LLaDA's linear schedule
            if p.threshold is not None:
                n = max(n, sum(conf[i] >= p.threshold for i in masked))
            if p.entropy_bound is not None:
                total, run = 0.0, 0
                for i in order:
                    pi = probs[i][probs[i] > 0].double()
                    total += float(-(pi * pi.log()).sum())
                    if total > p.entropy_bound:
                        break
                    run += 1
                n = max(n, run)
            for i in order[:n]:
                x[0, i] = x0[i]
            step, counts = step + 1, counts + [n]
            gen = x[0, L:].tolist()
            if exit_rule == "prefix":
                left = gen[:gen.index(mask_id)] if mask_id in gen else gen
                if any(t in eos for t in left):
                    return gen, step, counts
            if exit_rule == "dinfer" and mask_id not in gen[:hi - L] and any(t in eos for t in gen[lo - L:hi - L]):
                return gen[:hi - L] + [eos[0]] * (L + g - hi), step, counts
    return x[0, L:].tolist(), step, counts


# ---- models --------------------------------------------------------------------------------------------

def peaked_model(n_layer: int, attention: str = "bidirectional") -> torch.nn.Module:
    """A random model with spread-out logits (positions from near-certain to near-uniform, so an entropy
    bound commits some steps one token and others several), batch-invariant so that the reference's
    whole-canvas forward and the sampler's selected positions agree bit for bit."""
    torch.manual_seed(3)
    extra = dict(attention="block_causal", diffusion_block=8) if attention == "block_causal" else {}
    model = build_model(ModelConfig(vocab_size=V, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=64,
                                    context_len=96, **extra)).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(6.0)
    return set_batch_invariant(model)


@pytest.fixture(scope="module")
def one_layer() -> torch.nn.Module:
    return peaked_model(1)  # one layer: the approximate prefix/dual caches are exact (test_sampling)


@pytest.fixture(scope="module")
def two_layer() -> torch.nn.Module:
    return peaked_model(2)


@pytest.fixture(scope="module")
def block_causal() -> torch.nn.Module:
    return peaked_model(2, "block_causal")  # its cache is exact in any mode


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK, (k,), generator=g).tolist() for k in (5, 11, 3, 8, 14)[:n]]


EB_CASES = [  # the requests under test: entropy bounds across the range, greedy and sampled, uneven blocks
    dict(max_tokens=24, block_length=8, entropy_bound=0.5),
    dict(max_tokens=20, block_length=8, entropy_bound=2.0, temperature=1.0, seed=5),
    dict(max_tokens=16, block_length=16, entropy_bound=1.0, steps=6),  # steps < max_tokens: the schedule's floor
    dict(max_tokens=24, block_length=8, entropy_bound=4.0, remasking="random", seed=9),
]
OTHERS = [  # batch neighbours with other params
    dict(max_tokens=16, block_length=8, threshold=0.5),
    dict(max_tokens=12, block_length=4, steps=6, temperature=0.7, seed=2),
]


def with_cache(cases: list[dict], cache: str) -> list[SamplingParams]:
    return [SamplingParams(**c, cache=cache) for c in cases]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("which", ["one_layer", "block_causal"])
def test_entropy_bound_matches_the_reference_alone_and_batched(which: str, cache: str,
                                                                request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    block = 8 if which == "block_causal" else None
    cases = [c for c in EB_CASES if block is None or "remasking" not in c]  # block-causal: its own block
    cases = [{k: v for k, v in c.items() if block is None or k != "block_length"} for c in cases]
    params = with_cache(cases, cache)
    ps = prompts(len(params))
    committed_counts = set()
    for pr, prm in zip(ps, params, strict=True):
        want, nfe, counts = reference(model, pr, prm, MASK, model_block=block)
        [alone] = generate(model, [pr], prm, MASK)
        assert alone.tokens == want and alone.nfe == nfe, (prm, counts)
        committed_counts.update(counts)
    assert 1 in committed_counts and max(committed_counts) > 1  # the bound made both kinds of step
    others = with_cache([{k: v for k, v in c.items() if block is None or k != "block_length"} for c in OTHERS],
                        cache)
    mixed = [x for pair in zip(params, others + others, strict=False) for x in pair] + params[len(others) * 2:]
    mixed_prompts = [x for pair in zip(ps, prompts(len(others) * 2, seed=1), strict=False) for x in pair]
    mixed_prompts += ps[len(others) * 2:]
    together = generate(model, mixed_prompts, mixed, MASK, max_batch=3)  # rows join and leave mid-run
    for pr, prm, res in zip(mixed_prompts, mixed, together, strict=True):
        if prm.entropy_bound is not None:
            assert res.tokens == reference(model, pr, prm, MASK, model_block=block)[0]


def test_entropy_bound_two_layers_without_cache_matches_the_reference(two_layer: torch.nn.Module) -> None:
    params = with_cache(EB_CASES, "none")
    ps = prompts(len(params))
    got = generate(two_layer, ps, params, MASK)
    for pr, prm, res in zip(ps, params, got, strict=True):
        want, nfe, _ = reference(two_layer, pr, prm, MASK)
        assert res.tokens == want and res.nfe == nfe


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_huge_bound_commits_a_block_per_step_and_tiny_bound_one_token(one_layer: torch.nn.Module,
                                                                      cache: str) -> None:
    pr = prompts(1)
    for bound, per_step in ((1e9, 8), (1e-9, 1)):
        seen: list[int] = []
        [r] = generate(one_layer, pr, SamplingParams(max_tokens=24, block_length=8, entropy_bound=bound, cache=cache),
                       MASK, on_step=lambda i, ev, seen=seen: seen.append(len(ev.committed)))
        assert seen == [per_step] * (24 // per_step) and r.nfe == 24 // per_step and len(r.tokens) == 24


def test_the_rule_on_given_entropies() -> None:
    conf = torch.tensor([[0.9, 0.5, 0.8, 0.7, 0.1], [0.2, 0.9, 0.3, 0.4, 0.0]])
    ent = torch.tensor([[0.1, 2.0, 0.2, 0.3, 0.0], [0.5, 0.6, 0.1, 0.1, 0.0]])
    is_mask = torch.tensor([[True, True, True, True, False], [True, True, True, True, False]])
    one = torch.ones(2, dtype=torch.long)
    for bound, want in [(0.35, [[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]]),  # 0.1+0.2 | 0.6 (then +0.1 is 0.7)
                        (0.65, [[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]]),
                        (1e-3, [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])]:  # the most confident even over the bound
        select, count = select_commits(conf, is_mask, torch.tensor([8, 8]), torch.zeros(2), False, one, ent,
                                       torch.full((2,), bound))
        assert select.int().tolist() == want and count.tolist() == [sum(w) for w in want]
    # a row without a bound keeps its schedule beside one with it
    select, _ = select_commits(conf, is_mask, torch.tensor([8, 8]), torch.zeros(2), False, one, ent,
                               torch.tensor([0.0, 10.0]))
    assert select.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]


def test_entropy_is_exact_and_the_same_for_a_row_in_any_batch() -> None:
    g = torch.Generator().manual_seed(0)
    for vocab in (97, 4096, 5000):
        logits = torch.randn(6, 7, vocab, generator=g) * 3
        logits[..., 4] = float("-inf")  # the mask id
        h = entropy(logits)
        probs = logits.double().softmax(-1)
        exact = -(probs * probs.clamp(min=1e-300).log()).sum(-1)
        torch.testing.assert_close(h.double(), exact, rtol=1e-5, atol=1e-5)
        for rows, cols in [(slice(2, 3), slice(0, 1)), (slice(0, 4), slice(1, 5)), (slice(5, 6), slice(0, 7))]:
            assert torch.equal(entropy(logits[rows, cols].contiguous()), h[rows, cols])


def test_entropy_bound_is_checked() -> None:
    with pytest.raises(ValidationError, match="entropy_bound"):
        SamplingParams(threshold=0.9, entropy_bound=0.15)
    for bad in (0.0, -1.0):
        with pytest.raises(ValidationError, match="entropy_bound"):
            SamplingParams(entropy_bound=bad)
    assert SamplingParams(entropy_bound=0.15).early_exit is True


def test_the_cli_takes_the_fields() -> None:
    from clients.__main__ import build_parser  # noqa: PLC0415

    args = build_parser().parse_args(["hi", "--entropy-bound", "0.15", "--early-exit", "false"])
    assert (args.entropy_bound, args.early_exit) == (0.15, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["hi", "--early-exit", "maybe"])


# ---- early exit ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eos_model() -> Loaded:
    """The shipped model with its head's rows for EOS and newline swapped: it ends where it would start a
    new line (its text has many), so EOS comes early in the canvas."""
    m = load_checkpoint(ROOT / "models" / "shakespeare-small", device="cpu", dtype=torch.float32)
    newline = m.tokenizer.encode("\n")[-1]
    eos = m.tokenizer.eos_ids[0]
    with torch.no_grad():
        w = m.model.output.weight
        w[[eos, newline]] = w[[newline, eos]]
    set_batch_invariant(m.model)
    return m


EOS_PROMPTS = ["KING.\nNow is the", "ROMEO:", "First Citizen:\nWe are"]
EXIT_CASES = [dict(max_tokens=32, block_length=8), dict(max_tokens=32, block_length=8, steps=16),
              dict(max_tokens=24, block_length=8, threshold=0.3),
              dict(max_tokens=24, block_length=8, entropy_bound=3.0),
              dict(max_tokens=24, block_length=8, cache="dual", temperature=1.0, seed=4)]


def budget(p: SamplingParams, prompt_len: int) -> int:
    rp = plan(p, prompt_len, 384)
    base, extra = divmod(rp.steps, rp.num_blocks)
    return sum(min(base + (b < extra), rp.block_length, rp.max_tokens - b * rp.block_length)
               for b in range(rp.num_blocks))


def test_early_exit_writes_the_whole_canvas_tokens_with_fewer_forwards(eos_model: Loaded) -> None:
    m, eos = eos_model, eos_model.tokenizer.eos_ids
    ps = [m.tokenizer.encode(t) for t in EOS_PROMPTS]
    saved_any = False
    for case in EXIT_CASES:
        on_p, off_p = SamplingParams(**case), SamplingParams(**case, early_exit=False)
        fixed = "threshold" not in case and "entropy_bound" not in case  # the schedule alone: budgets exact
        last: dict[int, object] = {}
        committed: dict[int, set[int]] = {i: set() for i in range(len(ps))}

        def on_step(i: int, ev, last=last, committed=committed) -> None:
            last[i] = ev
            committed[i].update(ev.positions.tolist())

        on = generate(m.model, ps, on_p, m.mask_id, eos_id=eos, tokenizer=m.tokenizer, on_step=on_step)
        off = generate(m.model, ps, off_p, m.mask_id, eos_id=eos, tokenizer=m.tokenizer)
        for i, (a, b) in enumerate(zip(on, off, strict=True)):
            assert a.tokens == b.tokens and a.text == b.text and a.finish_reason == b.finish_reason, case
            planned = budget(off_p, len(ps[i]))
            assert b.nfe_saved == 0 and (b.nfe == planned if fixed else b.nfe <= planned)
            if a.finish_reason != "stop":
                continue
            assert a.nfe <= b.nfe and a.nfe_saved > 0
            if fixed:  # exact: each block takes its budget, so the saving is what the whole canvas spent more
                assert a.nfe + a.nfe_saved == planned == b.nfe
            else:  # the blocks left are counted at their budgets, which threshold/EB blocks may not use up
                assert a.nfe + a.nfe_saved <= planned
            ev, cut = last[i], len(a.tokens)
            canvas = ev.canvas.tolist()
            skipped = [q for q in range(len(canvas)) if q not in committed[i]]  # never denoised
            assert ev.done and ev.masked == 0 and m.mask_id not in canvas and canvas[cut] in eos
            assert ev.nfe_saved == a.nfe_saved and ev.filled == len(skipped)
            assert all(q > cut and canvas[q] == canvas[cut] for q in skipped)  # EOS after the EOS
            saved_any |= a.nfe_saved > 0
    assert saved_any


def test_early_exit_matches_the_reference_loops(eos_model: Loaded) -> None:
    """The existing rule (an EOS in the committed left part) ends no later than dInfer's (a fully committed
    block holding an EOS) and writes the same tokens up to that EOS as LLaDA's whole-canvas loop."""
    m, eos = eos_model, eos_model.tokenizer.eos_ids
    earlier = 0
    for text in EOS_PROMPTS:
        pr = m.tokenizer.encode(text)
        for case in EXIT_CASES[:3]:
            p = SamplingParams(**case)
            full, full_nfe, _ = reference(m.model, pr, p, m.mask_id)
            dinfer, dinfer_nfe, _ = reference(m.model, pr, p, m.mask_id, eos=eos, exit_rule="dinfer")
            prefix, prefix_nfe, _ = reference(m.model, pr, p, m.mask_id, eos=eos, exit_rule="prefix")
            last = []
            [r] = generate(m.model, [pr], p, m.mask_id, eos_id=eos, on_step=lambda i, ev, last=last: last.append(ev))
            cut = next((i for i, t in enumerate(full) if t in eos), len(full))
            assert r.tokens == full[:cut] == dinfer[:cut] == prefix[:cut]
            assert r.nfe == prefix_nfe <= dinfer_nfe <= full_nfe
            earlier += prefix_nfe < dinfer_nfe
            if cut < len(full):  # the final canvas: the committed tokens, EOS where it did not denoise
                canvas = last[-1].canvas.tolist()
                assert canvas[:cut + 1] == dinfer[:cut + 1]
                assert all(c == t or (t == m.mask_id and c == canvas[cut]) for c, t in zip(canvas, prefix, strict=True))
    assert earlier > 0  # it ends mid-block, where dInfer waits for the block


def test_early_exit_batched_with_others_matches_alone(eos_model: Loaded) -> None:
    m, eos = eos_model, eos_model.tokenizer.eos_ids
    ps = [m.tokenizer.encode(t) for t in EOS_PROMPTS] * 2
    params = [SamplingParams(**c, early_exit=bool(i % 2)) for i, c in enumerate(EXIT_CASES + EXIT_CASES[:1])]
    together = generate(m.model, ps, params, m.mask_id, eos_id=eos, max_batch=4)
    for pr, prm, res in zip(ps, params, together, strict=True):
        [alone] = generate(m.model, [pr], prm, m.mask_id, eos_id=eos)
        assert (res.tokens, res.nfe, res.nfe_saved) == (alone.tokens, alone.nfe, alone.nfe_saved)


def test_without_eos_ids_nothing_exits() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, context_len=64)).eval()
    [r] = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=16), MASK)
    assert r.nfe == 16 and r.nfe_saved == 0 and r.finish_reason == "length"


def test_early_exit_saving_with_absolute_blocks() -> None:
    """SDAR's layout: block 0 is the rest of the block the prompt ends in, shorter than the others."""
    torch.manual_seed(2)
    model = build_model(ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, context_len=64,
                                    attention="block_causal", diffusion_block=4, block_align="absolute")).eval()
    prompt = [5, 6, 7, 8, 9]  # ends 1 into a block: block 0 has 3 positions
    for steps in (None, 7):
        p = SamplingParams(max_tokens=18, steps=steps, cache="dual")
        [whole] = generate(model, [prompt], p, MASK)
        eos = whole.tokens[4]  # pretend the token at position 4 (block 1) is EOS
        [off] = generate(model, [prompt], p.model_copy(update={"early_exit": False}), MASK, eos_id=eos)
        [on] = generate(model, [prompt], p, MASK, eos_id=eos)
        cut = whole.tokens.index(eos)
        assert on.tokens == off.tokens == whole.tokens[:cut] and on.finish_reason == "stop"
        assert off.nfe == whole.nfe and on.nfe < off.nfe and on.nfe + on.nfe_saved == off.nfe
