"""tzd.quant on CUDA (skipped without a GPU; bench/gpu_check.sh runs it): the packed int8/int4 kernels and
fp8's _scaled_mm against the dequantized weights, and the default model loaded quantized onto the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.test_quant import dequantized, rel_err
from tzd.checkpoint import load_checkpoint
from tzd.quant import QuantConfig, formats, weight_bytes
from tzd.quant.config import FP8_CAPABILITY
from tzd.quant.linear import quantize_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEFAULT = Path(__file__).resolve().parent.parent / "models" / "shakespeare-small"


def fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_CAPABILITY


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("shape", [(96, 256), (90, 200), (4200, 128)])
def test_cuda_layer_matches_the_dequantized_weight(method: str, shape: tuple[int, int]) -> None:
    if method == "fp8" and not fp8_capable():
        pytest.skip("fp8 needs compute capability >= 8.9")
    g = torch.Generator().manual_seed(0)
    N, K = shape
    w, b = (torch.randn(N, K, generator=g) * 0.05).cuda(), (torch.randn(N, generator=g) * 0.1).cuda()
    x = torch.randn(5, K, generator=g).cuda().bfloat16()
    y = quantize_linear(w, b, method, 64, torch.bfloat16)(x)
    if method == "fp8":
        q, scale = formats.fp8_rows(w)
        ref = q.float() * scale[:, None]
    else:
        ref = dequantized(w, method, 64)
    # bf16 activations (fp8: e4m3 activations, ~3% per element) against the float product
    assert rel_err(y, F.linear(x.float(), ref, b)) < (0.06 if method == "fp8" else 0.01)


@pytest.mark.parametrize("quant", [QuantConfig("int8", head=True), QuantConfig("int4", 64, head=True),
                                   QuantConfig("fp8", head=True)], ids=lambda q: q.name)
def test_default_model_on_cuda(quant: QuantConfig) -> None:
    if quant.method == "fp8" and not fp8_capable():
        pytest.skip("fp8 needs compute capability >= 8.9")
    ref = load_checkpoint(DEFAULT, device="cuda", dtype=torch.bfloat16)
    q = load_checkpoint(DEFAULT, device="cuda", dtype=torch.bfloat16, quantization=quant)
    ids = torch.randint(5, 4000, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        got, want = q.model(ids).float(), ref.model(ids).float()
    assert rel_err(got, want) < (0.05 if quant.method == "int8" else 0.2)
    assert weight_bytes(q.model) < (0.55 if quant.method != "int4" else 0.3) * weight_bytes(ref.model)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_cuda_experts_match_the_dequantized_weights(method: str) -> None:
    """Quantized experts on the GPU (bf16, torch._grouped_mm on sm_90+) against the float layer of the same
    dequantized weights; only the bf16 rounding of the weights and products apart."""
    if method == "fp8" and not fp8_capable():
        pytest.skip("fp8 needs compute capability >= 8.9")
    from tests.test_moe import moe_config, random_layer
    from tests.test_quant_moe import dequantized_stack
    from tzd.quant.experts import QuantizedExperts, QuantizedStack

    cfg = moe_config(n_embd=64, moe_intermediate_size=64)
    layer = random_layer(cfg, seed=5).cuda()
    ex = layer.experts
    q = QuantizedExperts(*(QuantizedStack(w.detach(), method, 64, torch.bfloat16) for w in (ex.w1, ex.w3, ex.w2)))
    with torch.no_grad():
        for w in (ex.w1, ex.w3, ex.w2):
            w.copy_(dequantized_stack(w, method, 64))
    ex.bfloat16()
    x = torch.randn(13, cfg.n_embd, generator=torch.Generator().manual_seed(0)).cuda().bfloat16()
    with torch.no_grad():
        idx, weights = layer.gate(x)
        assert rel_err(q(x, idx, weights), ex(x, idx, weights)) < 0.02
