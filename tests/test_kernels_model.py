"""Whole models on the Triton path (TZD_KERNELS=triton) against the torch path (TZD_KERNELS=torch).

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before they are imported).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any triton.jit is decorated
DEVICE = "cuda" if ON_CUDA else "cpu"

pytest.importorskip("triton", reason="triton is not installed (pip install 'tzd[triton]')")

import kernels  # noqa: E402
from tzd.models import ForwardContext, ModelConfig, build_model  # noqa: E402
from tzd.models.blocks import block_ids  # noqa: E402

# fp32: the two paths differ only in summation order. bf16 rounds activations at every layer, so the
# bf16 paths are judged against the same weights in fp32: the Triton path's error must stay within
# BF16_SLACK times the torch path's own error.
FP32_TOL = (1e-4, 1e-5)
BF16_SLACK = 1.5


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into the Triton kernels (re-imported if they were first imported compiled/interpreted)."""
    calls = {"rope": 0, "attention": 0}
    for name, kernel, fn_name in (("kernels.triton_rope", "_rope_kernel", "rope"),
                                  ("kernels.triton_attention", "_attn_fwd", "attention")):
        mod = importlib.import_module(name)
        jit = getattr(getattr(mod, kernel), "fn", getattr(mod, kernel))
        if (type(jit).__name__ == "InterpretedFunction") == ON_CUDA:
            mod = importlib.reload(mod)
            kernels._triton.cache_clear()
        impl = getattr(mod, fn_name)

        def counted(*a, _impl=impl, _name=fn_name, **kw):
            calls[_name] += 1
            return _impl(*a, **kw)

        monkeypatch.setattr(mod, fn_name, counted)
    return calls


def _model(backend: str, dtype: torch.dtype, **arch) -> torch.nn.Module:
    # Head dim 32, GQA (4 query heads over 2 KV heads), half the dims rotated.
    cfg = ModelConfig(backend=backend, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                      context_len=32, rotary_fraction=0.5, **arch)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # init scales weights to 0.02: use larger ones so attention is far from uniform
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    return model.to(DEVICE, dtype).eval()  # cast after drawing: fp32 and bf16 models share weights


def _run(model, ids, ctx, mode, monkeypatch):
    monkeypatch.setenv("TZD_KERNELS", mode)
    return model(ids, ctx)


def _inputs():
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    # Row 1 is padded after 11 tokens and sits at shifted positions, as a serving batch would.
    ctx = ForwardContext(positions=(torch.arange(19)[None] + torch.tensor([[0], [5]])).to(DEVICE),
                         seqlens=torch.tensor([19, 11], device=DEVICE))
    return ids, ctx


@pytest.mark.parametrize("with_ctx", [False, True], ids=["plain", "padded"])
@pytest.mark.parametrize("backend", ["smdm", "litgpt"])
def test_model_logits_match_torch_path_fp32(backend, with_ctx, monkeypatch, spy):
    model = _model(backend, torch.float32)
    ids, ctx = _inputs()
    ctx = ctx if with_ctx else None
    with torch.no_grad():
        want = _run(model, ids, ctx, "torch", monkeypatch)
        assert spy == {"rope": 0, "attention": 0}
        got = _run(model, ids, ctx, "triton", monkeypatch)
    assert spy == {"rope": 2, "attention": 2}, "the Triton path was not taken"
    assert want.abs().mean() > 0.1  # the comparison is not of near-zero logits
    torch.testing.assert_close(got, want, rtol=FP32_TOL[0], atol=FP32_TOL[1])


@pytest.mark.parametrize("layout", ["training", "serving"])
@pytest.mark.parametrize("backend", ["smdm", "litgpt"])
def test_block_causal_model_logits_match_torch_path_fp32(backend, layout, monkeypatch, spy):
    model = _model(backend, torch.float32, attention="block_causal", diffusion_block=4)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ctx = None  # the training layout: blocks of 4 from position 0
    if layout == "serving":  # prompts of 6 and 3 tokens as their own blocks; row 1 padded after 11 tokens
        ctx = ForwardContext(seqlens=torch.tensor([19, 11], device=DEVICE),
                             block_ids=block_ids(19, torch.tensor([6, 3], device=DEVICE), 4))
    with torch.no_grad():
        want = _run(model, ids, ctx, "torch", monkeypatch)
        got = _run(model, ids, ctx, "triton", monkeypatch)
    assert spy == {"rope": 2, "attention": 2}, "the Triton path was not taken"
    torch.testing.assert_close(got, want, rtol=FP32_TOL[0], atol=FP32_TOL[1])


@pytest.mark.parametrize("backend", ["smdm", "litgpt"])
def test_model_logits_bf16_as_close_as_torch_path(backend, monkeypatch, spy):
    ids, ctx = _inputs()
    with torch.no_grad():
        exact = _run(_model(backend, torch.float32), ids, ctx, "torch", monkeypatch)
        model = _model(backend, torch.bfloat16)
        torch_err = (_run(model, ids, ctx, "torch", monkeypatch).float() - exact).abs()
        triton_err = (_run(model, ids, ctx, "triton", monkeypatch).float() - exact).abs()
    assert spy == {"rope": 2, "attention": 2}, "the Triton path was not taken"
    assert triton_err.max() <= BF16_SLACK * torch_err.max(), (triton_err.max(), torch_err.max())
    assert triton_err.mean() <= BF16_SLACK * torch_err.mean(), (triton_err.mean(), torch_err.mean())


@pytest.mark.parametrize("backend", ["smdm", "litgpt"])
def test_model_gradients_match_torch_path(backend, monkeypatch, spy):
    # Training: RoPE's Triton backward, attention in torch (no Triton attention backward).
    model = _model(backend, torch.float32).train()
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = {}
    for mode in ("torch", "triton"):
        model.zero_grad()
        _run(model, ids, None, mode, monkeypatch).float().logsumexp(-1).mean().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert spy == {"rope": 2, "attention": 0}
    for name, g in grads["triton"].items():
        torch.testing.assert_close(g, grads["torch"][name], rtol=1e-4, atol=1e-6, msg=name)
