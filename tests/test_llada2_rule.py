"""LLaDA2's sampling rule (ModelConfig.decode_rule "llada2", set by the LLaDA2 family): TZD's tokens equal
those of the published generate()'s algorithm, written here from its semantics on the independent
reference forward of test_hf_llada2 (steps per block, each block's schedule from the block length, a
threshold that commits what exceeds it, blocks from position 0 with the canvas run on to its last block's
end, the stop after a block that holds EOS, the output cut at the first EOS).

One difference is TZD's on purpose and kept in the reference: the mask id is never a prediction (its
logit is -inf), as everywhere in TZD."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from tests.hf_checkpoints import write_llada2
from tests.test_hf_llada2 import llada2_reference
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.sampling import SamplingParams, SamplingParamsError, generate, plan

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def llada2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Loaded]:
    path = write_llada2(tmp_path_factory.mktemp("llada2rule") / "model")
    return path, load_checkpoint(path, device="cpu", dtype=torch.float32)


@functools.cache  # each case's reference once, for both cache modes
def reference_generate(path: Path, prompt: tuple[int, ...], gen_length: int, mask_id: int, eos_id: int,
                       block: int = 32, steps: int = 32, threshold: float = 0.95) -> list[int]:
    """The published generate()'s loop, greedy (temperature 0), eos_early_stop off (its default)."""
    steps = min(steps, gen_length)
    P = len(prompt)
    num_blocks = math.ceil((P + gen_length) / block)
    x = torch.full((num_blocks * block,), mask_id, dtype=torch.long)
    x[:P] = torch.tensor(prompt)
    base, extra = divmod(block, steps)
    schedule = [base + (1 if i < extra else 0) for i in range(steps)]
    for b in range(P // block, num_blocks):
        end = (b + 1) * block
        for i in range(steps):
            active = x[end - block:end] == mask_id
            if not active.any():
                break
            logits = llada2_reference(path, x[None, :end])[0, end - block:end].double()
            logits[:, mask_id] = float("-inf")
            probs = logits.softmax(-1)
            x0 = probs.argmax(-1)
            conf = torch.where(active, probs.gather(-1, x0[:, None])[:, 0].float(), float("-inf"))
            high = conf > threshold
            if int(high.sum()) >= schedule[i]:
                transfer = high
            else:
                transfer = torch.zeros(block, dtype=torch.bool)
                transfer[torch.topk(conf, min(schedule[i], int(active.sum()))).indices] = True
            x[end - block:end][transfer] = x0[transfer]
        if (x[P:end] == eos_id).any():
            break
    out = x[P:P + gen_length].tolist()
    return out[:out.index(eos_id)] if eos_id in out else out  # TZD's tokens stop before the EOS


CASES = [  # prompt length, max_tokens, steps per block, threshold
    (5, 20, None, None),  # a partial first block; the canvas runs on past max_tokens to the block's end
    (32, 40, 8, 0.95),  # the prompt fills block 0: decoding starts at block 1; 4 commits per step
    (37, 30, 5, 0.004),  # an uneven schedule (7, 7, 6, 6, 6) and a threshold low enough to commit in parallel
]


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("case", CASES)
def test_tokens_equal_the_published_loop(llada2, case: tuple, cache: str) -> None:
    path, L = llada2
    assert L.model_config.decode_rule == "llada2"
    P, n, steps, threshold = case
    prompt = [(7 * i + 3) % 280 + 1 for i in range(P)]
    sp = SamplingParams(max_tokens=n, steps=steps, threshold=threshold, cache=cache, seed=0)
    [got] = generate(L.model, [prompt], sp, L.mask_id, eos_id=L.tokenizer.eos_ids)
    want = reference_generate(path, tuple(prompt), n, L.mask_id, L.tokenizer.eos_ids[0], steps=steps or 32,
                              threshold=1.0 if threshold is None else threshold)
    assert got.tokens == want and len(got.tokens) == n  # a random model does not write the real EOS


def test_a_block_with_eos_ends_it_and_the_output_stops_there(llada2) -> None:
    """An EOS id the model does write (a token of its own output, named EOS here): the reference stops after
    that token's block and cuts there; TZD ends at the same tokens."""
    path, L = llada2
    prompt = (11, 12, 13, 14, 15, 16, 17)
    free = reference_generate(path, prompt, 50, L.mask_id, eos_id=-1, threshold=1.0)
    eos = free[30]  # in the second generated block
    want = reference_generate(path, prompt, 50, L.mask_id, eos, threshold=1.0)
    [got] = generate(L.model, [list(prompt)], SamplingParams(max_tokens=50, seed=0), L.mask_id, eos_id=eos)
    assert got.tokens == want and len(want) < 50 and got.finish_reason == "stop"


def test_the_plan_of_the_rule(llada2) -> None:
    cfg = llada2[1].model_config
    p = plan(SamplingParams(max_tokens=20, steps=5, threshold=0.5), 5, cfg.context_len, 32, True, rule="llada2")
    assert (p.max_tokens, p.visible, p.first_block, p.num_blocks) == (27, 20, 27, 1)
    assert p.block_schedule == (7, 7, 6, 6, 6) and p.block_budgets == (5,)  # 7 + 7 + 6 + 6 = 26 < 27
    assert p.threshold > 0.5 and float(torch.tensor(p.threshold, dtype=torch.float32)) == p.threshold
    two = plan(SamplingParams(max_tokens=40), 32, cfg.context_len, 32, True, rule="llada2")
    assert (two.max_tokens, two.num_blocks, two.block_budgets, two.steps) == (64, 2, (32, 32), 64)
    with pytest.raises(SamplingParamsError, match="block_length"):
        plan(SamplingParams(max_tokens=40, block_length=16), 3, cfg.context_len, 32, True, rule="llada2")
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        plan(SamplingParams(max_tokens=40), 30, 64, 32, True, rule="llada2")  # 70 runs on to 96 > 64
