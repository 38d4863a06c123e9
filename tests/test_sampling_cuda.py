"""On CUDA, a denoising step synchronises with the device once: the device-to-host copy of its results.

Every other per-step value goes up in one non-blocking copy (tzd.sampling.rows), so the host can queue
the next kernels while the GPU works. Skipped without CUDA (CI); bench/gpu_check.sh runs it on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tzd.models import ModelConfig, build_model
from tzd.sampling import SamplingParams, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MASK = 3


def _count_syncs(fn) -> tuple[object, int]:
    """(fn(), how many synchronizing CUDA operations it made), by torch's sync debug mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_sync_per_step_in_a_mixed_batch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, n_embd=64, context_len=96)
    model = build_model(cfg).cuda().to(dtype).eval().requires_grad_(False)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15] * 12, [16, 17], [18, 19, 20]]
    common = {"max_tokens": 32, "steps": 32, "block_length": 16}
    params = [SamplingParams(**common, seed=1),  # LLaDA
              SamplingParams(**common, seed=2, threshold=0.5, cache="dual"),
              SamplingParams(**common, seed=3, cache="prefix", temperature=1.0, top_k=20, top_p=0.9),
              SamplingParams(**common, seed=4, remasking="random", cfg_scale=0.5),
              SamplingParams(**common, seed=5, entropy_bound=0.5, cache="dual")]  # EB, and early exit at EOS 9
    run = lambda: generate(model, prompts, params, MASK, eos_id=9)  # noqa: E731
    with torch.inference_mode():
        first = run()  # compiles and autotunes the Triton kernels for these shapes
        second, syncs = _count_syncs(run)
    steps = max(r.steps for r in second)  # the batch steps until its last request is done
    assert [r.tokens for r in second] == [r.tokens for r in first]
    assert syncs == steps, f"{syncs} synchronizing operations over {steps} steps"


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_entropy_bound_is_batch_invariant(cache: str) -> None:
    """EB's entropies and their running sums in a fixed order (tzd.sampling.rules): a request's commits
    do not depend on its batch-mates on the GPU either."""
    from tests.test_samplers import EB_CASES, MASK, OTHERS, peaked_model, prompts, with_cache  # noqa: PLC0415

    model = peaked_model(2).cuda()
    params = with_cache(EB_CASES, cache)
    ps = prompts(len(params))
    with torch.inference_mode():
        alone = [generate(model, [pr], prm, MASK)[0].tokens for pr, prm in zip(ps, params, strict=True)]
        together = generate(model, ps + prompts(len(OTHERS), seed=1), params + with_cache(OTHERS, cache), MASK)
    assert [r.tokens for r in together[:len(params)]] == alone
