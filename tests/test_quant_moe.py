"""Quantized mixture-of-experts weights (tzd.quant.experts): the layer against the float one on the same
dequantized weights, only the routed experts dequantized, and load_checkpoint with int8 and int4 on a tiny
checkpoint of each expert family (TZD's own MoE config, trained by the real trainer; LLaDA2.0's and SDAR-MoE's
Hugging Face layouts, random): no float expert stack left, the bytes held, the MoE layers' and the logits'
error against the float model, generation, batch invariance, fp8's refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.conftest import TINY_OVERRIDES, run_trainer
from tests.hf_checkpoints import write_llada2, write_sdar_moe
from tests.test_moe import moe_config, random_layer
from tests.test_quant import dequantized, exact_in, rel_err
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.models.invariant import set_batch_invariant
from tzd.models.moe import Experts, MoEFeedForward
from tzd.quant import QuantConfig, QuantizationError, count_weights, formats, quantize_model, weight_bytes
from tzd.quant.experts import QuantizedExperts, QuantizedStack
from tzd.quant.linear import QuantizedLinear
from tzd.sampling import SamplingParams, generate

pytest.importorskip("tokenizers")
# widths int4's default group (64) divides: w1 and w3 take n_embd inputs, w2 moe_intermediate_size. (At
# test_moe's 32 and 16 the padding to a group would be most of the int4 bytes.)
WIDE = dict(n_embd=64, moe_intermediate_size=64)
QUANTS = [QuantConfig("int8"), QuantConfig("int4")]  # int4 in the default groups of 64
KINDS = ["tzd", "llada2", "sdar_moe"]
# An MoE layer's output against the float layer's on the same input (so the same experts: the router is float),
# ||q - f|| / ||f||. int8 rounds a weight to 1/254 of its row's range: on a Gaussian row of 64 an error of ~0.55%
# of the row's RMS, and SwiGLU composes three such matrices (gate * up, then down): measured 1.0-1.1% on the
# random families (std 0.2), 0.13% on the trained one. int4 in groups of 64 rounds to 1/30 of a group's range
# (~8% a matrix): measured 14-17% on the random families, 2.1% on the trained one.
LAYER_TOL = {"int8": 0.02, "int4": 0.25}
# The trained model's logits against its float self's: the MoE layers' error diluted by the residual stream and
# the float head; measured 2.5e-5 (int8) and 9e-4 (int4-g64) on three sets of ids.
LOGITS_TOL = {"int8": 5e-4, "int4": 1e-2}


def dequantized_stack(w: torch.Tensor, method: str, group: int) -> torch.Tensor:
    """The float stack [E, N, K] a QuantizedStack stands for, from the formats (each expert's rows as a matrix's)."""
    E, N, K = w.shape
    rows = w.detach().reshape(E * N, K)
    if method == "fp8":
        q, scale = formats.fp8_rows(rows)
        return (q.float() * scale[:, None]).view(E, N, K)
    return dequantized(rows, method, group).view(E, N, K)


def quantized_copy(ex: Experts, method: str, group: int) -> QuantizedExperts:
    return QuantizedExperts(*(QuantizedStack(w.detach(), method, group, torch.float32) for w in (ex.w1, ex.w3, ex.w2)))


# ---- the layer -----------------------------------------------------------------------------------------

# fp8's format on the CPU too (its conversions run there; serving it is refused off a capable GPU)
@pytest.mark.parametrize("method, group", [("int8", 64), ("int4", 32), ("int4", 64), ("fp8", 64)])
@pytest.mark.parametrize("invariant", [False, True], ids=["fast", "invariant"])
def test_quantized_experts_compute_the_dequantized_weights(method: str, group: int, invariant: bool) -> None:
    """test_moe's widths (C=32, W=16): int4 pads w2's 16 inputs, and w1/w3's 32 in groups of 64."""
    cfg = moe_config()
    layer = random_layer(cfg, seed=5)
    ex = layer.experts
    q = quantized_copy(ex, method, group)
    with torch.no_grad():
        for w in (ex.w1, ex.w3, ex.w2):
            w.copy_(dequantized_stack(w, method, group))
    ex.batch_invariant = q.batch_invariant = invariant
    x = torch.randn(13, cfg.n_embd, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        idx, weights = layer.gate(x)
        want, got = ex(x, idx, weights), q(x, idx, weights)
    if invariant:  # the same per-expert tiles on the same weights: the same bits
        assert torch.equal(got, want)
    else:
        assert rel_err(got, want) < 1e-5


def test_only_the_routed_experts_are_dequantized(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = moe_config()
    layer = random_layer(cfg, seed=3)
    with torch.no_grad():  # only experts 0..2 can be chosen
        layer.gate.expert_bias.copy_(torch.tensor([5.0, 5.0, 5.0, -9, -9, -9, -9, -9]))
    quantize_model(layer, QuantConfig("int8"), torch.float32, torch.float32)
    assert isinstance(layer.experts, QuantizedExperts) and isinstance(layer.gate.weight, nn.Parameter)
    seen: list[list[int]] = []
    dequantize = QuantizedStack.dequantize

    def recorded(self: QuantizedStack, ids: torch.Tensor) -> torch.Tensor:
        seen.append(ids.tolist())
        return dequantize(self, ids)

    monkeypatch.setattr(QuantizedStack, "dequantize", recorded)
    with torch.no_grad():
        layer(torch.randn(2, 5, cfg.n_embd))
    assert seen == [[0, 1, 2]] * 3  # w1, w3, w2 of the three chosen experts, not of all 8
    # what stays between forwards: the int8 tables and their scales, nothing float of the experts' size
    held = {name: (b.dtype, tuple(b.shape)) for name, b in layer.experts.named_buffers()}
    assert held == {"w1.q": (torch.int8, (8, 16, 32)), "w1.scale": (torch.float32, (8, 16)),
                    "w3.q": (torch.int8, (8, 16, 32)), "w3.scale": (torch.float32, (8, 16)),
                    "w2.q": (torch.int8, (8, 32, 16)), "w2.scale": (torch.float32, (8, 32))}
    assert not list(layer.experts.parameters())


# ---- whole models of each family ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant_moe")
    # TZD's own: conftest's tiny model (2 layers, width 64) with both feed-forwards 8 experts, top 2, trained for
    # 120 steps (about 15 s on 2 cores), so that its logits can be compared with the float model's
    run_trainer(*TINY_OVERRIDES, "+model.n_experts=8", "+model.n_experts_per_token=2",
                "+model.moe_intermediate_size=64", "training.max_steps=120", "training.precision=32-true",
                f"out_dir={root / 'tzd'}")
    return {"tzd": root / "tzd" / "last", "llada2": write_llada2(root / "llada2", **WIDE),
            "sdar_moe": write_sdar_moe(root / "sdar_moe", **WIDE)}


def logits(loaded: Loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(ids).float()


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def moe_layer_errors(ref: Loaded, q: Loaded, ids: torch.Tensor) -> list[float]:
    """Each quantized MoE layer on the input the float model's layer got, against the float layer's output."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [f.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for f in moe_layers(ref.model)]
    logits(ref, ids)
    for h in hooks:
        h.remove()
    with torch.inference_mode():
        return [rel_err(f(x), want) for f, (x, want) in zip(moe_layers(q.model), seen, strict=True)]


def logits_and_routes(loaded: Loaded, ids: torch.Tensor, impose: list | None = None) -> tuple[torch.Tensor, list]:
    """The logits and every router's (expert ids, weights); `impose`: routers' outputs to use instead of their own."""
    routes: list = []
    given = iter(impose or [])

    def hook(module: nn.Module, args: tuple, out: tuple) -> tuple:
        routes.append(out)
        return next(given) if impose is not None else out

    hooks = [f.gate.register_forward_hook(hook) for f in moe_layers(loaded.model)]
    try:
        return logits(loaded, ids), routes
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.name)
def test_load_checkpoint_quantizes_the_experts(checkpoints: dict[str, Path], kind: str, quant: QuantConfig) -> None:
    ref = load_checkpoint(checkpoints[kind], device="cpu")
    q = load_checkpoint(checkpoints[kind], device="cpu", quantization=quant)
    layers = moe_layers(q.model)
    assert len(layers) == 2  # every family's tiny model has two MoE layers
    assert all(isinstance(f.experts, QuantizedExperts) and f.experts.w2.method == quant.method for f in layers)
    assert not any(isinstance(m, Experts) for m in q.model.modules())
    assert not [n for n, _ in q.model.named_parameters() if ".experts." in n]  # no float stack left
    assert all(f.gate.weight.dtype == torch.float32 for f in layers)  # the router stays float
    assert count_weights(q.model) == count_weights(ref.model)

    ids = torch.randint(5, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    errors = moe_layer_errors(ref, q, ids)
    assert max(errors) < LAYER_TOL[quant.method], errors
    # the whole model computes what the float one with its quantized weights dequantized computes, given the same
    # experts: int4's linear layers compute in bf16 on the CPU, whose rounding can flip a near-tie choice of these
    # random routers (measured up to 16% apart then); with the quantized model's choices imposed on the float one,
    # int8 is exact and int4 within that rounding (measured up to 1.6%)
    got, routes = logits_and_routes(q, ids)
    with torch.no_grad():
        for name, m in ref.model.named_modules():
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in ("output", "lm_head"):
                m.weight.copy_(dequantized(m.weight, quant.method, quant.group_size))
            elif isinstance(m, Experts):
                for w in (m.w1, m.w3, m.w2):
                    w.copy_(dequantized_stack(w, quant.method, quant.group_size))
    want, _ = logits_and_routes(ref, ids, impose=routes)
    assert rel_err(got, want) < (1e-4 if exact_in(quant.method, torch.float32) else 3e-2)

    prompt = q.tokenizer.encode("To be, or not")
    [out] = generate(q.model, [prompt], SamplingParams(max_tokens=8, steps=8), q.mask_id, eos_id=None,
                     tokenizer=q.tokenizer)
    assert len(out.tokens) == 8 and q.mask_id not in out.tokens


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.name)
def test_trained_moe_logits_stay_close(checkpoints: dict[str, Path], quant: QuantConfig) -> None:
    ids = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = logits(load_checkpoint(checkpoints["tzd"], device="cpu"), ids)
    got = logits(load_checkpoint(checkpoints["tzd"], device="cpu", quantization=quant), ids)
    assert rel_err(got, ref) < LOGITS_TOL[quant.method], rel_err(got, ref)


def expected_expert_bytes(model: nn.Module, quant: QuantConfig, scale_bytes: int) -> int:
    """Every stack's table (1 byte a weight for int8, half a byte for int4, its inputs padded to the group) and
    its scales (one per row; int4: a scale and a zero point per group of a row)."""
    total = 0
    for m in model.modules():
        if isinstance(m, Experts):
            for w in (m.w1, m.w3, m.w2):
                E, N, K = w.shape
                if quant.method == "int8":
                    total += E * N * (K + scale_bytes)
                else:
                    groups = -(-K // quant.group_size)
                    total += E * N * groups * (quant.group_size // 2 + 2 * scale_bytes)
    return total


@pytest.mark.parametrize("kind", KINDS)
def test_expert_bytes_shrink_and_are_counted(checkpoints: dict[str, Path], kind: str) -> None:
    """Against bf16 stacks (2 bytes a weight): int8 ~0.5x plus a scale a row, int4-g64 ~0.25x plus its groups'
    (at these widths, 64 inputs a row: 0.516x and 0.281x)."""
    ref = load_checkpoint(checkpoints[kind], device="cpu", dtype=torch.bfloat16)
    expert_float = sum(p.nbytes for m in ref.model.modules() if isinstance(m, Experts) for p in m.parameters())
    for quant, bound in ((QuantConfig("int8"), 0.55), (QuantConfig("int4"), 0.3)):
        q = load_checkpoint(checkpoints[kind], device="cpu", dtype=torch.bfloat16, quantization=quant)
        stacks = [m for m in q.model.modules() if isinstance(m, QuantizedStack)]
        assert len(stacks) == 6
        expert_q = sum(b.nbytes for s in stacks for b in s.buffers())
        assert expert_q == expected_expert_bytes(ref.model, quant, scale_bytes=2)
        ratio = expert_q / expert_float
        assert ratio <= bound, (quant.name, ratio)
        # weight_bytes (/health, /v1/models, tzd_model_weight_bytes): float parameters, quantized linear layers,
        # quantized experts, nothing twice
        linear_q = sum(b.nbytes for m in q.model.modules() if isinstance(m, QuantizedLinear)
                       for b in m.buffers(recurse=False))
        float_params = sum(p.nbytes for p in q.model.parameters())
        assert weight_bytes(q.model) == float_params + linear_q + expert_q
        assert weight_bytes(q.model) < weight_bytes(ref.model) - expert_float * (1 - bound)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: q.name)
def test_quantized_moe_model_batch_invariant(checkpoints: dict[str, Path], kind: str, quant: QuantConfig) -> None:
    q = load_checkpoint(checkpoints[kind], device="cpu", quantization=quant)
    set_batch_invariant(q.model)
    assert all(f.experts.batch_invariant for f in moe_layers(q.model))
    ids = torch.randint(5, 250, (5, 20), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(q, ids)[1:2], logits(q, ids[1:2]))


def test_fp8_experts_refused_off_a_capable_gpu(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(QuantizationError, match="fp8 needs a CUDA GPU of compute capability >= 8.9"):
        load_checkpoint(checkpoints["llada2"], device="cpu", quantization="fp8")
