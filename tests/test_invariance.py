"""The batch-invariant path (tzd.models.invariant, kernels.invariant): a row's output is bit for bit the
same alone and inside any batch (other rows, padding, longer keys and queries), in fp32 and bf16, and
it computes the same function as the default path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import invariant, reference
from tzd.models import ForwardContext, ModelConfig, build_model
from tzd.models.invariant import InvariantLinear, is_batch_invariant, set_batch_invariant, tiled_linear

DTYPES = [torch.float32, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _embed(row: torch.Tensor, B: int, L: int, at: int, gen: torch.Generator) -> torch.Tensor:
    """A random [B,Hx,L,D] batch whose row `at` starts with `row` [1,Hx,n,D] (the rest is other data)."""
    out = torch.randn(B, row.shape[1], L, row.shape[3], generator=gen).to(row.dtype)
    out[at, :, :row.shape[2]] = row[0]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_attention_row_is_the_same_in_any_batch(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    H, Hk = heads
    for T, n in [(3, 44), (32, 101), (70, 300), (200, 200)]:
        q, k, v = (torch.randn(1, h, t, 64, generator=gen).to(dtype) for h, t in ((H, T), (Hk, n), (Hk, n)))
        alone = invariant.attention(q, k, v)
        exact = reference.attention(q.float(), k.float(), v.float())
        torch.testing.assert_close(alone.float(), exact, **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32
                                                               else {"rtol": 1.6e-2, "atol": 1.6e-2}))
        for B, extra_q, extra_k, at in [(1, 0, 1, 0), (5, 0, 70, 3), (3, 200, 300, 1), (2, 31, 700, 1)]:
            S = n + extra_k
            lens = torch.randint(1, S + 1, (B,), generator=gen)
            lens[at] = n
            y = invariant.attention(_embed(q, B, T + extra_q, at, gen), _embed(k, B, S, at, gen),
                                    _embed(v, B, S, at, gen), seqlens=lens)[at:at + 1, :, :T]
            assert torch.equal(y, alone), (dtype, T, n, B, extra_q, extra_k)


def test_attention_layouts_match_the_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 90, 32, generator=gen) for _ in range(3))
    blocks = torch.arange(90)[None].expand(2, -1) // 16
    lens = torch.tensor([90, 57])
    for kw in ({}, {"seqlens": lens}, {"causal": True, "seqlens": lens}, {"q_blocks": blocks, "k_blocks": blocks},
               {"mask": (torch.rand(2, 1, 90, 90, generator=gen) < 0.5) | torch.eye(90, dtype=torch.bool)},
               {"scale": 0.3, "seqlens": lens}):
        torch.testing.assert_close(invariant.attention(q, k, v, **kw), reference.attention(q, k, v, **kw),
                                   rtol=1e-5, atol=1e-5)
    # the dispatcher routes invariant=True here on CPU
    assert torch.equal(kernels.attention(q, k, v, seqlens=lens, invariant=True), invariant.attention(q, k, v, lens))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_linear_rows_do_not_depend_on_the_row_count(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(96, 80, generator=gen) * 0.1).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype)
    x = torch.randn(300, 80, generator=gen).to(dtype)
    full = tiled_linear(x, w, b)
    torch.testing.assert_close(full.float(), F.linear(x.float(), w.float(), b.float()),
                               **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))
    for start, stop in [(0, 1), (5, 8), (7, 40), (33, 300), (100, 101)]:  # M <= 3 takes MKL's other fp32 path
        assert torch.equal(tiled_linear(x[start:stop], w, b), full[start:stop]), (start, stop)
    assert torch.equal(tiled_linear(x.view(3, 100, 80), w, b), full.view(3, 100, 96))


def _model(backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(backend=backend, vocab_size=300, context_len=160, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=64)
    return build_model(cfg).eval()


@pytest.mark.parametrize("backend", ["smdm", "litgpt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_model_logits_of_a_row_are_the_same_alone_and_batched(backend: str, precision: str) -> None:
    model = _model(backend)
    if precision == "bf16-autocast":  # the CPU serving default where the CPU has bf16 units
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.to(torch.bfloat16)
    set_batch_invariant(model)
    gen = torch.Generator().manual_seed(3)
    lengths = [37, 150, 90, 5, 122]
    ids = torch.randint(0, 300, (5, 150), generator=gen)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        alone = [model(ids[i:i + 1, :n]) for i, n in enumerate(lengths)]
        batched = model(ids, ForwardContext(seqlens=torch.tensor(lengths)))
        pos = torch.tensor([[1, 4, 2]] * 5)  # the sampler's selection of output positions
        picked = model(ids, ForwardContext(seqlens=torch.tensor(lengths), output_positions=pos))
    for i, n in enumerate(lengths):
        assert torch.equal(batched[i, :n], alone[i][0]), (backend, precision, i)
        assert torch.equal(picked[i], alone[i][0, pos[i]])


def test_switching_keeps_the_weights_and_goes_back() -> None:
    model = _model("smdm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 20))
    with torch.inference_mode():
        fast = model(ids)
        set_batch_invariant(model)
        assert is_batch_invariant(model) and all(type(m) is InvariantLinear for m in model.modules()
                                                 if isinstance(m, torch.nn.Linear))
        torch.testing.assert_close(model(ids), fast, rtol=1e-5, atol=1e-5)
        set_batch_invariant(model, False)
        assert not is_batch_invariant(model)
        assert not any(type(m) is InvariantLinear for m in model.modules())
        assert torch.equal(model(ids), fast)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_attention_row_is_the_same_in_any_batch(dtype: torch.dtype) -> None:
    """The Triton kernel with its one fixed tile (and the torch path for masks) on the GPU."""
    gen = torch.Generator().manual_seed(4)
    for T, n in [(3, 44), (32, 101), (200, 300), (700, 900)]:
        q, k, v = (torch.randn(1, 4, t, 64, generator=gen).to("cuda", dtype) for t in (T, n, n))
        alone = kernels.attention(q, k, v, invariant=True)
        for B, extra_q, extra_k, at in [(5, 0, 70, 3), (3, 200, 300, 1), (16, 900, 1200, 7)]:
            S = n + extra_k
            lens = torch.randint(1, S + 1, (B,), generator=gen)
            lens[at] = n
            y = kernels.attention(_embed(q.cpu(), B, T + extra_q, at, gen).cuda(),
                                  _embed(k.cpu(), B, S, at, gen).cuda(), _embed(v.cpu(), B, S, at, gen).cuda(),
                                  seqlens=lens.cuda(), invariant=True)[at:at + 1, :, :T]
            assert torch.equal(y, alone), (dtype, T, n, B)
        blocks = torch.arange(n, device="cuda")[None] // 16
        alone = kernels.attention(q, k, v, q_blocks=blocks[:, :T], k_blocks=blocks, invariant=True)
        kb = torch.arange(n + 64, device="cuda")[None].expand(2, -1) // 16
        y = kernels.attention(torch.cat([q, torch.randn_like(q)]), torch.cat([F.pad(k, (0, 0, 0, 64))] * 2),
                              torch.cat([F.pad(v, (0, 0, 0, 64))] * 2), seqlens=torch.tensor([n, n + 64]).cuda(),
                              q_blocks=kb[:, :T], k_blocks=kb, invariant=True)[:1]
        assert torch.equal(y, alone), (dtype, T, n, "block-causal")
