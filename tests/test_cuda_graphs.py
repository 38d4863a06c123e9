"""CUDA graphs of the cached step (tzd.sampling.cuda_graphs): tokens identical to the eager forward.

On CPU the graphs' padded static path runs eagerly (capture=False): rows padded up to the batch bucket,
keys up to the key bucket, padding rows on the scratch page, the window's logits gathered after the
forward. That is everything but the capture itself, and it must give the eager tokens exactly. On CUDA
(skipped without one; bench/gpu_check.sh runs it) the real capture and replay must too.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_block_causal import sampler_model
from tzd.models import ModelConfig, build_model
from tzd.sampling import DenoiseBatch, SamplingParams, plan
from tzd.sampling.cuda_graphs import BATCH_BUCKETS, KEY_BUCKET, WindowGraphs


def bidirectional_model() -> torch.nn.Module:
    torch.manual_seed(3)
    model = build_model(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_len=96)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # spread-out logits: no argmax near-ties
    return model


CASES = [  # (prompt lengths, params): a batch of 3 (bucket 4), mixed keys, threshold and a prefix row
    ((5, 17, 30), [SamplingParams(max_tokens=32, steps=32, block_length=8, cache="dual", seed=1),
                   SamplingParams(max_tokens=24, steps=12, block_length=8, cache="dual", threshold=0.5, seed=2),
                   SamplingParams(max_tokens=16, steps=16, block_length=8, cache="prefix", temperature=1.0, seed=3)]),
]


def run(model: torch.nn.Module, lengths: tuple[int, ...], params: list[SamplingParams], graphs: str,
        block: int | None = None) -> tuple[list[list[int]], WindowGraphs | None]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]
    batch = DenoiseBatch(model, 96, capacity=len(prompts), device=next(model.parameters()).device,
                         cuda_graphs=graphs == "capture")
    if graphs == "eager":
        batch.runner.graphs = WindowGraphs(model, batch.kv, 96, batch.context, block is not None, capture=False)
    out: dict[int, list[int]] = {}
    for i, (pr, p) in enumerate(zip(prompts, params, strict=True)):
        batch.add(pr, plan(p, len(pr), 96, block), handle=i)
    while len(batch):
        for ev in batch.step():
            if ev.done:
                out[ev.handle] = ev.canvas.tolist()
    return [out[i] for i in range(len(prompts))], batch.runner.graphs


@pytest.mark.parametrize("lengths,params", CASES)
def test_padded_static_path_gives_the_eager_tokens(lengths: tuple[int, ...], params: list[SamplingParams]) -> None:
    model = bidirectional_model()
    eager, _ = run(model, lengths, params, "off")
    bucketed, graphs = run(model, lengths, params, "eager")
    assert bucketed == eager
    assert any(R == 4 for R, _, _ in graphs.buckets)  # 3 rows padded to 4 (later fewer, as requests finish)
    assert all(R in BATCH_BUCKETS and S % KEY_BUCKET == 0 for R, _, S in graphs.buckets)


def test_padded_static_path_exact_block_cache() -> None:
    model = sampler_model()
    params = [SamplingParams(max_tokens=24, steps=24, cache="dual", seed=i) for i in range(3)]
    eager, _ = run(model, (5, 11, 19), params, "off", block=8)
    bucketed, graphs = run(model, (5, 11, 19), params, "eager", block=8)
    assert bucketed == eager and graphs.buckets


def test_graphs_refuse_a_cpu_model() -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DenoiseBatch(bidirectional_model(), 96, capacity=1, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_graphs_give_the_eager_tokens(dtype: torch.dtype) -> None:
    for model, block in ((bidirectional_model(), None), (sampler_model(), 8)):
        model = model.cuda().to(dtype)
        params = CASES[0][1] if block is None else [SamplingParams(max_tokens=24, steps=24, cache="dual", seed=i)
                                                     for i in range(3)]
        with torch.inference_mode():
            eager, _ = run(model, (5, 17, 30), params, "off", block)
            captured, graphs = run(model, (5, 17, 30), params, "capture", block)
        assert captured == eager
        assert any(b is not None and b.graph is not None for b in graphs.buckets.values()), graphs.buckets

