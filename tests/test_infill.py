"""Infilling and per-token log-probabilities in the sampler (tzd.sampling.infill, tzd.sampling.scores).

On the default model in models/ and on tiny LLaDA and Dream checkpoints in their published layouts: the
suffix and an infill's fixed text are never masked nor overwritten, the canvas has exactly its length, a
request gives the same tokens alone and batched, and every committed token's log-probability (and its top
alternatives) is the model's at the step it was committed, by a direct forward of the row as it was then.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hf_checkpoints import write_dream, write_llada
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.sampling import DenoiseBatch, Layout, SamplingParams, SamplingParamsError, generate, plan
from tzd.sampling.infill import GAP

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "ROMEO:\nBut soft, what light through yonder "
SUFFIX = " breaks? It is the east, and Juliet is the sun."


@pytest.fixture(scope="module")
def default() -> Loaded:
    return load_checkpoint(ROOT / "models" / "shakespeare-small", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Loaded]:
    root = tmp_path_factory.mktemp("hf-infill")
    return {"llada": load_checkpoint(write_llada(root / "llada"), device="cpu"),
            "dream": load_checkpoint(write_dream(root / "dream"), device="cpu")}


def run_rows(ckpt: Loaded, prompt: list[int], layout: Layout | None, params: SamplingParams,
             others: int = 0) -> tuple[list, list[np.ndarray]]:
    """Denoise one request (beside `others` plain ones) step by step; its events, and its device row
    (prompt + canvas + suffix) before every step."""
    batch = DenoiseBatch(ckpt.model, ckpt.mask_id, capacity=1 + others)
    context = batch.context
    for j in range(others):
        p = SamplingParams(max_tokens=6 + j, seed=10 + j)
        batch.add(prompt[: 2 + j], plan(p, 2 + j, context), handle=f"other{j}")
    p = plan(params, len(prompt), context, layout=layout)
    slot = batch.add(prompt, p, handle="me")
    events, rows = [], []
    while len(batch):
        before = batch.canvas[slot, :p.total_len].clone()
        mine = [e for e in batch.step() if e.handle == "me"]
        if mine:
            rows.append(before)
            events.append(mine[0])
    return events, rows


def forward_logprobs(ckpt: Loaded, row: torch.Tensor) -> torch.Tensor:
    """Log-softmax of a direct forward of one row, the mask id never a prediction (as the runner does)."""
    with torch.inference_mode():
        logits = ckpt.model(row[None]).float()[0]
        logits[:, ckpt.mask_id] = float("-inf")
        return logits.log_softmax(dim=-1)


def test_suffix_is_kept_and_the_canvas_has_its_length(default: Loaded) -> None:
    tok = default.tokenizer
    prompt, suffix = tok.encode(PREFIX), tok.encode(SUFFIX)
    layout = Layout.gap(8, suffix)
    events, rows = run_rows(default, prompt, layout, SamplingParams(max_tokens=8, seed=0))
    for row in rows:  # every step saw the prompt and the suffix, untouched
        assert row[:len(prompt)].tolist() == prompt
        assert row[len(prompt) + 8:].tolist() == suffix
    assert all(len(e.canvas) == 8 for e in events)
    assert events[-1].done and (events[-1].canvas != default.mask_id).all()
    assert len(events) == 8  # steps default to the gap's positions
    [r] = generate(default.model, [prompt], SamplingParams(max_tokens=8, seed=0), default.mask_id,
                   eos_id=tok.eos_ids, tokenizer=tok, layouts=[layout])
    assert r.gaps == [r.tokens] and len(r.tokens) <= 8 and r.gap_texts == [r.text]
    # the model does see the suffix: the same prompt without it fills differently
    [plain] = generate(default.model, [prompt], SamplingParams(max_tokens=8, seed=0), default.mask_id,
                       eos_id=tok.eos_ids, tokenizer=tok)
    assert plain.tokens != r.tokens


def test_several_gaps_keep_their_text_and_fill_every_gap(default: Loaded) -> None:
    tok = default.tokenizer
    middle = tok.encode(" soft, what light through yonder window")  # longer than a block: a block of text alone
    parts = [tok.encode("ROMEO:\n"), 5, middle, 3, 3, tok.encode(" breaks?")]  # adjacent gaps merge
    prompt, layout = Layout.of_parts(parts)
    assert prompt == parts[0] and layout.suffix == tuple(parts[-1]) and layout.gaps() == [(0, 5), (5 + len(middle), 6)]
    params = SamplingParams(seed=1, block_length=4)
    events, rows = run_rows(default, prompt, layout, params)
    fixed = np.array(layout.fill) != GAP
    for row, ev in zip(rows, events, strict=True):
        assert row[len(prompt):len(prompt) + layout.canvas_len][torch.from_numpy(fixed)].tolist() == middle
        assert (ev.canvas[fixed] == np.array(middle)).all()
        assert set(ev.positions.tolist()).isdisjoint(np.flatnonzero(fixed).tolist())
    # blocks of 4 hold 4, 1, 0, 2 and 4 masked positions: 11 steps over the 4 blocks with masks are 3, 3, 3
    # and 2, capped at each block's masks (3, 1, 2, 2); the block of text alone takes none
    assert layout.masked == 11 and len(events) == 8
    [r] = generate(default.model, [prompt], params, default.mask_id, eos_id=tok.eos_ids, tokenizer=tok,
                   layouts=[layout])
    assert len(r.gaps) == 2 and len(r.gaps[0]) <= 5 and len(r.gaps[1]) <= 6


def test_eos_in_a_gap_is_padding(default: Loaded) -> None:
    from tzd.sampling import finish_canvas
    tok = default.tokenizer
    eos = tok.eos_ids[0]
    a, b = tok.encode("To be"), tok.encode(" or not")
    _, layout = Layout.of_parts([[7], 4, [9], 4, [8]])
    canvas = np.array([a[0], eos, a[1] if len(a) > 1 else a[0], eos, 9, *b[:2], eos, eos])
    f = finish_canvas(canvas, "length", tok.eos_ids, [], tok.decode, layout)
    assert f.finish_reason == "stop" and f.positions == [0, 2, 5, 6]
    assert f.gaps == [[canvas[0], canvas[2]], b[:2]]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_infill_alone_and_batched_give_the_same_tokens(default: Loaded, cache: str) -> None:
    tok = default.tokenizer
    prompt, suffix = tok.encode(PREFIX), tok.encode(SUFFIX)
    params = SamplingParams(max_tokens=16, block_length=8, steps=8, seed=3, cache=cache, top_logprobs=3)
    alone, _ = run_rows(default, prompt, Layout.gap(16, suffix), params)
    batched, _ = run_rows(default, prompt, Layout.gap(16, suffix), params, others=3)
    assert [e.tokens.tolist() for e in alone] == [e.tokens.tolist() for e in batched]
    assert [e.positions.tolist() for e in alone] == [e.positions.tolist() for e in batched]
    for x, y in zip(alone, batched, strict=True):
        np.testing.assert_allclose(x.probs, y.probs, rtol=1e-5, atol=1e-6)
        assert (x.top_ids == y.top_ids).all()


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_logprobs_are_the_models_at_the_commit_step(default: Loaded, threshold: float | None) -> None:
    tok = default.tokenizer
    prompt, suffix = tok.encode(PREFIX), tok.encode(SUFFIX)
    params = SamplingParams(max_tokens=12, block_length=6, seed=5, top_logprobs=4, threshold=threshold,
                            temperature=0.8)
    events, rows = run_rows(default, prompt, Layout.gap(12, suffix), params)
    check_commit_scores(default, prompt, events, rows, 4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_hf_families_infill_and_score_at_the_commit_step(hf: dict[str, Loaded], family: str) -> None:
    ckpt = hf[family]
    tok = ckpt.tokenizer
    prompt, suffix = tok.encode("To be, or not"), tok.encode(" that is the question")
    events, rows = run_rows(ckpt, prompt, Layout.gap(6, suffix), SamplingParams(max_tokens=6, seed=2, top_logprobs=2))
    for row in rows:
        assert row[len(prompt) + 6:].tolist() == suffix
    check_commit_scores(ckpt, prompt, events, rows, 2)  # Dream: the logits at i come from the output at i-1


def check_commit_scores(ckpt: Loaded, prompt: list[int], events: list, rows: list[torch.Tensor], k: int) -> None:
    for ev, row in zip(events, rows, strict=True):
        lp = forward_logprobs(ckpt, row)[len(prompt) + torch.from_numpy(ev.positions)]
        want = lp.gather(1, torch.from_numpy(ev.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.from_numpy(np.log(ev.probs)), want, atol=2e-4, rtol=1e-4)
        top = lp.topk(k, dim=-1)
        torch.testing.assert_close(torch.from_numpy(ev.top_logprobs), top.values, atol=2e-4, rtol=1e-4)
        # ids agree wherever the alternatives' scores are not tied
        gaps = (top.values[:, :-1] - top.values[:, 1:]).abs() > 1e-4
        assert (torch.from_numpy(ev.top_ids)[:, :-1] == top.indices[:, :-1])[gaps].all()


def test_plan_checks_an_infill() -> None:
    ok = plan(SamplingParams(max_tokens=4), 3, 20, layout=Layout.gap(4, [1, 2]))
    assert ok.total_len == 9 and ok.masked == 4 and not ok.early_exit
    with pytest.raises(SamplingParamsError) as e:
        plan(SamplingParams(max_tokens=4), 3, 20, model_block=4, layout=Layout.gap(4, [1, 2]))
    assert e.value.field == "suffix" and "block" in str(e.value)
    with pytest.raises(SamplingParamsError) as e:
        plan(SamplingParams(max_tokens=4), 3, 8, layout=Layout.gap(4, [1, 2]))
    assert e.value.field == "suffix"
    with pytest.raises(SamplingParamsError) as e:
        plan(SamplingParams(max_tokens=4, cfg_scale=1.0), 3, 20, layout=Layout.gap(4, [1]))
    assert e.value.field == "cfg_scale"
    with pytest.raises(SamplingParamsError) as e:  # more steps than gap positions
        plan(SamplingParams(steps=5), 1, 40, layout=Layout.of_parts([[1], 2, [5, 6], 2])[1])
    assert e.value.field == "steps"
