"""Weight-only quantization (tzd.quant): the quantized layers against float ones, load_checkpoint with each
method on TZD's own checkpoint and the families' Hugging Face layouts, the bytes held, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.hf_checkpoints import write_dream, write_llada, write_sdar
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.models.invariant import set_batch_invariant
from tzd.quant import QuantConfig, QuantizationError, count_weights, formats, weight_bytes
from tzd.quant.embedding import QuantizedEmbedding
from tzd.quant.linear import Int4Linear, Int8Linear, QuantizedLinear, quantize_linear
from tzd.sampling import SamplingParams, generate

# Relative error ||y_q - y|| / ||y|| of a layer of Gaussian weights against its float self: int8 per channel
# rounds to 1/254 of a row's range (measured ~0.4%), int4 in groups of 64 to 1/30 of a group's (~8%).
REL_TOL = {"int8": 0.01, "int4": 0.12}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def dequantized(w: torch.Tensor, method: str, group: int) -> torch.Tensor:
    """The weight a quantized layer stands for, computed from the formats (not from a layer's packed tensors)."""
    if method == "int8":
        q, scale = formats.int8_rows(w)
        return q.float() * scale[:, None]
    q, scale, zero = formats.int4_groups(formats.pad_to(w, 1, group), group)
    return formats.int4_dequantize(q, scale, zero)[:, :w.shape[1]]


def exact_in(method: str, dtype: torch.dtype) -> bool:
    """Whether a layer's product is fp32-exact: int4 runs its CPU kernel in bf16 even for fp32 models
    (tzd.quant.linear.PACKED_DTYPES), so its rows carry bf16 activations' rounding (~0.4%)."""
    return dtype == torch.float32 and method == "int8"


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# N not a multiple of 16, K not of the group; more rows than formats.ROW_CHUNK (quantized and packed in chunks)
@pytest.mark.parametrize("shape", [(96, 256), (90, 200), (278, 64), (4200, 64)])
def test_quantized_linear_matches_the_float_one(method: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    N, K = shape
    w, b = torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g) * 0.1
    x = torch.randn(3, 7, K, generator=g)
    layer = quantize_linear(w, b, method, 64, dtype)
    y = layer(x)
    assert y.shape == (3, 7, N) and y.dtype == dtype
    # the kernel computes exactly the dequantized weight's product (up to the dtype's rounding)
    exact = F.linear(x.to(dtype).float(), dequantized(w, method, 64), b)
    assert rel_err(y, exact) < (1e-5 if exact_in(method, dtype) else 1e-2)
    assert rel_err(y, F.linear(x, w, b)) < REL_TOL[method]


def test_group_size_must_be_a_power_of_two_the_kernels_take() -> None:
    with pytest.raises(QuantizationError, match="group size 48"):
        QuantConfig("int4", group_size=48)
    with pytest.raises(QuantizationError, match="int3"):
        QuantConfig("int3")


def test_batch_invariant_quantized_rows_do_not_depend_on_the_batch() -> None:
    g = torch.Generator().manual_seed(1)
    layer = quantize_linear(torch.randn(64, 128, generator=g), None, "int4", 32, torch.float32)
    layer.batch_invariant = True
    x = torch.randn(45, 128, generator=g)
    full = layer(x)
    for start, stop in ((0, 1), (3, 5), (10, 45)):
        assert torch.equal(layer(x[start:stop]), full[start:stop])


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_embedding_returns_the_rows_it_stands_for(method: str) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 40, generator=g)  # 40 columns: int4 groups of 32 need padding
    emb = QuantizedEmbedding(w, method, 32, torch.float32)
    ids = torch.tensor([[0, 7, 49], [7, 7, 3]])
    assert emb(ids).shape == (2, 3, 40)
    assert rel_err(emb(ids), w[ids]) < REL_TOL[method]


def test_fp8_is_refused_off_a_capable_gpu(tiny_checkpoint: Path) -> None:
    with pytest.raises(QuantizationError, match="fp8 needs a CUDA GPU of compute capability >= 8.9"):
        load_checkpoint(tiny_checkpoint, device="cpu", quantization="fp8")


# ---- whole models -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    return {"tzd": tiny_checkpoint, "llada": write_llada(root / "llada"), "dream": write_dream(root / "dream"),
            "sdar": write_sdar(root / "sdar"), "llada_tied": write_llada(root / "tied", tie_embeddings=True)}


def logits(loaded: Loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(ids).float()


def float_linear_bytes(model: nn.Module, head: bool) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (head or n.rpartition(".")[2] not in ("output", "lm_head")))


@pytest.mark.parametrize("kind", ["tzd", "llada", "dream", "sdar"])
@pytest.mark.parametrize("quant", [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int8", head=True),
                                   QuantConfig("int4", 32, head=True)], ids=lambda q: q.name)
def test_load_checkpoint_quantized(checkpoints: dict[str, Path], kind: str, quant: QuantConfig) -> None:
    ref = load_checkpoint(checkpoints[kind], device="cpu")
    q = load_checkpoint(checkpoints[kind], device="cpu", quantization=quant)
    assert q.quantization == quant
    kinds = {type(m) for m in q.model.modules()}
    assert (Int8Linear if quant.method == "int8" else Int4Linear) in kinds
    assert nn.Linear not in kinds if quant.head else nn.Linear in kinds  # the head stays float without +head
    assert (QuantizedEmbedding in kinds) == quant.head
    assert count_weights(q.model) == count_weights(ref.model)
    # bytes: the quantized layers hold int8 (1 byte) or packed int4 (half a byte) for every fp32 weight (4)
    linear = float_linear_bytes(ref.model, quant.head)
    held, before = weight_bytes(q.model), weight_bytes(ref.model)
    per_weight = 1 / 4 if quant.method == "int8" else 1 / 8
    assert held < before - linear * (1 - per_weight) * 0.8, (held, before, linear)
    # the whole model computes what the float model with every quantized weight dequantized computes
    with torch.no_grad():
        for name, m in ref.model.named_modules():
            if isinstance(m, nn.Embedding if quant.head else ()) or (
                    isinstance(m, nn.Linear) and (quant.head or name.rpartition(".")[2] not in ("output", "lm_head"))):
                m.weight.copy_(dequantized(m.weight, quant.method, quant.group_size))
    ids = torch.randint(5, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    assert rel_err(logits(q, ids), logits(ref, ids)) < (1e-4 if exact_in(quant.method, torch.float32) else 2e-2)
    tokenizer = q.tokenizer
    prompt = tokenizer.encode("To be, or not")
    [out] = generate(q.model, [prompt], SamplingParams(max_tokens=8, steps=8), q.mask_id,
                     eos_id=None, tokenizer=tokenizer)
    assert len(out.tokens) == 8 and q.mask_id not in out.tokens


@pytest.mark.parametrize("quant", [QuantConfig("int8", head=True), QuantConfig("int4", 64, head=True)],
                         ids=lambda q: q.name)
def test_trained_model_logits_stay_close(tiny_checkpoint: Path, quant: QuantConfig) -> None:
    """On trained weights (the random ones above amplify any rounding) the logits move little."""
    ids = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = logits(load_checkpoint(tiny_checkpoint, device="cpu"), ids)
    got = logits(load_checkpoint(tiny_checkpoint, device="cpu", quantization=quant), ids)
    assert rel_err(got, ref) < REL_TOL[quant.method], rel_err(got, ref)


def test_tied_int8_head_and_embedding_share_one_table(checkpoints: dict[str, Path]) -> None:
    ref = load_checkpoint(checkpoints["llada_tied"], device="cpu")
    assert ref.model.output.weight is ref.model.tok_embeddings.weight
    q = load_checkpoint(checkpoints["llada_tied"], device="cpu", quantization=QuantConfig("int8", head=True))
    assert q.model.tok_embeddings.table is q.model.output.weight_int8
    assert count_weights(q.model) == count_weights(ref.model)
    ids = torch.randint(5, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    assert rel_err(logits(q, ids), logits(ref, ids)) < 0.05


def test_quantized_model_batch_invariant(tiny_checkpoint: Path) -> None:
    q = load_checkpoint(tiny_checkpoint, device="cpu", quantization=QuantConfig("int8", head=True))
    set_batch_invariant(q.model)
    assert all(m.batch_invariant for m in q.model.modules() if isinstance(m, QuantizedLinear))
    ids = torch.randint(5, 250, (5, 20), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(q, ids)[1:2], logits(q, ids[1:2]))


def test_bf16_weights_shrink_by_the_expected_factor(checkpoints: dict[str, Path]) -> None:
    """Against bf16 weights (2 bytes): int8 with the head ~0.5x plus scales, int4 in groups of 32 ~0.25x + scales."""
    before = weight_bytes(load_checkpoint(checkpoints["llada"], device="cpu", dtype=torch.bfloat16).model)
    for quant, bound in ((QuantConfig("int8", head=True), 0.55), (QuantConfig("int4", 32, head=True), 0.35)):
        q = load_checkpoint(checkpoints["llada"], device="cpu", dtype=torch.bfloat16, quantization=quant)
        assert weight_bytes(q.model) / before < bound, quant.name


def test_litgpt_backend_quantized_in_place() -> None:
    """TZD's litgpt backend names its layers otherwise (attn.qkv, mlp.fc_1, lm_head, wte): quantized all the same."""
    from tzd.models import ModelConfig, build_model
    from tzd.quant import quantize_model

    torch.manual_seed(0)
    cfg = ModelConfig(backend="litgpt", vocab_size=96, context_len=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                      intermediate_size=128)
    model, ref = build_model(cfg).eval(), build_model(cfg).eval()
    ref.load_state_dict(model.state_dict())
    quant = QuantConfig("int8", head=True)
    quantize_model(model, quant, torch.float32, torch.float32)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(dequantized(m.weight, "int8", 64))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert rel_err(model(ids), ref(ids)) < 1e-4
