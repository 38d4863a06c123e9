"""The Triton kernels against the torch references, and the dispatch between them.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before the kernel
modules are imported). On a CUDA machine with TRITON_INTERPRET unset or 0 they run compiled.
Every output is poisoned with NaN before the call so that an element the kernel fails to write shows.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any triton.jit below is decorated
DEVICE = "cuda" if ON_CUDA else "cpu"

pytest.importorskip("triton", reason="triton is not installed (pip install 'tzd[triton]')")

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from tzd.models.blocks import block_ids  # noqa: E402


def _load(name: str, kernel: str):
    """Import a kernel module, re-importing it if it was first imported with the other TRITON_INTERPRET."""
    mod = importlib.import_module(name)
    fn = getattr(mod, kernel)
    fn = getattr(fn, "fn", fn)  # autotuned kernels wrap the jit function
    if (type(fn).__name__ == "InterpretedFunction") == ON_CUDA:
        mod = importlib.reload(mod)
        kernels._triton.cache_clear()
    return mod


triton_rope = _load("kernels.triton_rope", "_rope_kernel")
triton_attention = _load("kernels.triton_attention", "_attn_fwd")
triton_commit = _load("kernels.triton_commit", "_select")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# RoPE does fp32 arithmetic and one rounding, like the reference: fp32/fp16 agree to 1 ulp. The
# interpreter truncates fp32 -> bf16 where torch rounds to nearest, so bf16 is allowed 1 ulp (2**-7 rel.).
ROPE_TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (2**-7, 1e-5)}
# Attention against the fp32 result: the kernel rounds p to the input dtype before p @ v.
ATTN_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> None:
    assert not actual.isnan().any(), "kernel left elements unwritten (NaN poison) or produced NaN"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol[0], atol=tol[1])


def _rand(*shape: int, dtype: torch.dtype = torch.float32, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


# ---- RoPE ------------------------------------------------------------------------------------------

# (B, T, H, Hk, D, R, positions): odd T, GQA, partial rotary (R < D, R/2 not a power of two), positions
ROPE_CASES = [
    (2, 7, 4, 2, 16, 16, None),
    (2, 9, 4, 1, 32, 12, "random"),
    (3, 5, 2, 2, 64, 32, "shared"),
    (1, 1, 3, 3, 32, 2, "random"),
]


def _rope_inputs(case, dtype, seed=0):
    B, T, H, Hk, D, R, pos = case
    gen = torch.Generator().manual_seed(seed)
    # q and k as strided views of one fused projection, as the models produce them.
    qkv = _rand(B, T, H + 2 * Hk, D, dtype=dtype, gen=gen)
    q, k = qkv[:, :, :H], qkv[:, :, H:H + Hk]
    S = T + 11
    cos, sin = reference.rope_cache(S, R, device=DEVICE)
    if pos == "random":
        pos = torch.randint(0, S, (B, T), generator=gen).to(DEVICE)
    elif pos == "shared":  # one row of positions broadcast over the batch (stride 0)
        pos = torch.randperm(S, generator=gen)[:T].to(DEVICE).expand(B, T)
    return qkv, q, k, cos, sin, pos


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "B{}T{}H{}Hk{}D{}R{}-{}".format(*c))
def test_rope_matches_reference(case, dtype):
    _, q, k, cos, sin, pos = _rope_inputs(case, dtype)
    out = (torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE),
           torch.full(k.shape, float("nan"), dtype=dtype, device=DEVICE))
    qo, ko = triton_rope.rope_fwd(q, k, cos, sin, pos, out=out)
    assert qo is out[0] and ko is out[1]
    q_ref, k_ref = reference.rope(q, k, cos, sin, pos)
    _close(qo, q_ref, ROPE_TOL[dtype])
    _close(ko, k_ref, ROPE_TOL[dtype])
    R = 2 * cos.shape[1]
    assert torch.equal(qo[..., R:], q[..., R:]), "pass-through dims must be copied bit for bit"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", ROPE_CASES[:2], ids=lambda c: "B{}T{}H{}Hk{}D{}R{}-{}".format(*c))
def test_rope_backward_matches_autograd(case, dtype):
    qkv, _, _, cos, sin, pos = _rope_inputs(case, dtype, seed=1)
    H, Hk = case[2], case[3]
    gen = torch.Generator().manual_seed(2)
    grads = {}
    for name, fn in (("triton", triton_rope.rope), ("reference", reference.rope)):
        x = qkv.detach().clone().requires_grad_(True)
        q, k = fn(x[:, :, :H], x[:, :, H:H + Hk], cos, sin, pos)
        gen.manual_seed(2)
        gq = _rand(*q.shape, dtype=dtype, gen=gen)
        gk = _rand(*k.shape, dtype=dtype, gen=gen)
        ((q.float() * gq.float()).sum() + (k.float() * gk.float()).sum()).backward()
        grads[name] = x.grad
    assert grads["triton"][:, :, H + Hk:].eq(0).all(), "v's slice of the fused tensor gets no gradient"
    _close(grads["triton"], grads["reference"], ROPE_TOL[dtype])


# ---- attention -------------------------------------------------------------------------------------

# (B, H, Hk, T, S, D, seqlens, scale). The interpreter's tile is 16x16: 19 cuts a tile, 16 ends one,
# 1 is a lone key, 0 a row with no keys (zeros, like SDPA), 50 > S is clamped.
ATTN_CASES = [
    (2, 4, 4, 37, 37, 32, None, None),
    (3, 4, 2, 37, 45, 64, [45, 19, 1], None),
    (3, 4, 1, 5, 33, 16, [33, 0, 50], 0.3),
    (1, 2, 1, 20, 17, 128, [16], None),
]


def _attn_inputs(case, dtype, seed=0):
    B, H, Hk, T, S, D, seqlens, scale = case
    gen = torch.Generator().manual_seed(seed)
    # q/k/v as transposes of [B,T,H,D] projections, as the models produce them.
    q = _rand(B, T, H, D, dtype=dtype, gen=gen).transpose(1, 2)
    k = _rand(B, S, Hk, D, dtype=dtype, gen=gen).transpose(1, 2)
    v = _rand(B, S, Hk, D, dtype=dtype, gen=gen).transpose(1, 2)
    sl = torch.tensor(seqlens, device=DEVICE) if seqlens is not None else None
    return q, k, v, sl, scale


def _attn_case_id(c) -> str:
    return "B{}H{}Hk{}T{}S{}D{}-sl{}-sc{}".format(*c).replace(" ", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=_attn_case_id)
def test_attention_matches_reference(case, dtype):
    q, k, v, sl, scale = _attn_inputs(case, dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    got = triton_attention.attention(q, k, v, sl, scale, out=out)
    assert got is out
    expected = reference.attention(q.float(), k.float(), v.float(), sl, scale)
    _close(got, expected, ATTN_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_never_reads_keys_past_seqlen(dtype):
    # NaN keys/values past each row's length would poison the output if any were loaded unmasked.
    case = (3, 4, 2, 21, 64, 32, [64, 19, 33], None)
    q, k, v, sl, scale = _attn_inputs(case, dtype, seed=3)
    expected = reference.attention(q.float(), k.float(), v.float(), sl, scale)
    k, v = k.clone(), v.clone()
    for b, n in enumerate(case[6]):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    _close(triton_attention.attention(q, k, v, sl, scale), expected, ATTN_TOL[dtype])


# ---- block-causal attention -----------------------------------------------------------------------

# (B, H, Hk, T, S, D, seqlens, prompt_lens, block, window_starts). Keys are a row's positions 0..S-1 in
# the serving layout (tzd.models.blocks.block_ids: the prompt cut into blocks, then the generated blocks);
# the queries are a window of T of them starting at window_starts[b], as the sampler runs a block window
# against the whole sequence. None starts: T == S, the queries are the keys (a full forward). A window
# may reach past seqlens[b] (padding): those queries still see their earlier blocks.
BLOCK_CASES = [
    (2, 4, 4, 37, 37, 32, None, [0, 0], 8, None),  # the training layout: blocks of 8 from position 0
    (3, 4, 2, 21, 45, 64, [45, 40, 33], [7, 0, 13], 8, [24, 10, 5]),  # GQA, padding, mid-sequence windows
    (3, 4, 1, 16, 64, 16, [64, 19, 64], [30, 5, 1], 16, [48, 3, 17]),  # block 16 = the interpreter's tile
    (2, 2, 1, 5, 33, 128, [33, 30], [11, 20], 4, [28, 14]),  # one small query tile, blocks of 4
]


def _block_inputs(case, dtype, seed=0):
    B, H, Hk, T, S, D, seqlens, prompts, block, starts = case
    q, k, v, sl, _ = _attn_inputs((B, H, Hk, T, S, D, seqlens, None), dtype, seed)
    k_blocks = block_ids(S, torch.tensor(prompts, device=DEVICE), block)
    if starts is None:
        q_blocks = k_blocks[:, :T]
    else:
        positions = torch.tensor(starts, device=DEVICE)[:, None] + torch.arange(T, device=DEVICE)
        q_blocks = k_blocks.gather(1, positions)
    return q, k, v, sl, q_blocks, k_blocks


def _block_case_id(c) -> str:
    return "B{}H{}Hk{}T{}S{}D{}-sl{}-p{}-blk{}-w{}".format(*c).replace(" ", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=_block_case_id)
def test_block_causal_attention_matches_reference(case, dtype):
    q, k, v, sl, qb, kb = _block_inputs(case, dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    got = triton_attention.attention(q, k, v, sl, out=out, q_blocks=qb, k_blocks=kb)
    assert got is out
    expected = reference.attention(q.float(), k.float(), v.float(), sl, q_blocks=qb, k_blocks=kb)
    _close(got, expected, ATTN_TOL[dtype])
    # the mask matters: the bidirectional result differs
    assert not torch.allclose(expected, reference.attention(q.float(), k.float(), v.float(), sl), atol=1e-2)


def test_block_causal_broadcast_layout_and_empty_queries():
    # One key layout [1,S] shared by the batch (the training layout), and queries that see no key: their
    # block (0) is below every key's (keys start at block 1), so they get zeros, as SDPA gives.
    q, k, v, _, _ = _attn_inputs((2, 2, 1, 20, 30, 32, None, None), torch.float32, seed=5)
    kb = block_ids(30, 0, 8, DEVICE)  # [1,30]
    qb = torch.stack((kb[0, 10:], kb[0, :20])).clone()  # [2,20]: windows at 10 and at 0
    kb = kb + 1
    qb[0, 0] = 0
    got = triton_attention.attention(q, k, v, q_blocks=qb, k_blocks=kb)
    expected = reference.attention(q, k, v, q_blocks=qb, k_blocks=kb)
    _close(got, expected, ATTN_TOL[torch.float32])
    blind = qb < kb.min()  # [B,T]: queries below every key's block
    assert blind.sum() == 9 and got.transpose(1, 2)[blind].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_block_causal_never_reads_keys_above_the_diagonal(dtype):
    # NaN keys/values in blocks after every query's block would poison the output if any were loaded:
    # the key tiles above the block diagonal must be skipped, not masked.
    case = (2, 4, 2, 24, 80, 32, [80, 70], [8, 8], 16, [8, 24])
    q, k, v, sl, qb, kb = _block_inputs(case, dtype, seed=4)
    expected = reference.attention(q.float(), k.float(), v.float(), sl, q_blocks=qb, k_blocks=kb)
    k, v = k.clone(), v.clone()
    for b in range(2):
        above = kb[b] > qb[b].max()
        assert above.sum() >= 24, "the case must put whole key tiles (16 under the interpreter) above the diagonal"
        k[b, :, above] = float("nan")
        v[b, :, above] = float("nan")
    _close(triton_attention.attention(q, k, v, sl, q_blocks=qb, k_blocks=kb), expected, ATTN_TOL[dtype])


def test_block_causal_rejects_bad_block_ids():
    q, k, v, sl, qb, kb = _block_inputs(BLOCK_CASES[1], torch.float32)
    with pytest.raises(ValueError, match="q_blocks must be"):
        triton_attention.attention(q, k, v, sl, q_blocks=qb[:, :-1], k_blocks=kb)
    with pytest.raises(ValueError, match="k_blocks must hold integer"):
        triton_attention.attention(q, k, v, sl, q_blocks=qb, k_blocks=kb.float())
    with pytest.raises(ValueError, match="go together"):
        kernels.attention(q, k, v, sl, q_blocks=qb)


# ---- dispatch --------------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into the Triton kernels."""
    calls = {"rope": 0, "attention": 0}
    rope_impl, attn_impl = triton_rope.rope, triton_attention.attention

    def rope(*a, **kw):
        calls["rope"] += 1
        return rope_impl(*a, **kw)

    def attention(*a, **kw):
        calls["attention"] += 1
        return attn_impl(*a, **kw)

    monkeypatch.setattr(triton_rope, "rope", rope)
    monkeypatch.setattr(triton_attention, "attention", attention)
    return calls


def test_dispatch_forced_triton_runs_kernels(monkeypatch, spy):
    monkeypatch.setenv("TZD_KERNELS", "triton")
    _, q, k, cos, sin, pos = _rope_inputs(ROPE_CASES[1], torch.float32)
    qo, ko = kernels.rope(q, k, cos, sin, pos)
    qa, ka, va, sl, _ = _attn_inputs(ATTN_CASES[1], torch.float32)
    out = kernels.attention(qa, ka, va, seqlens=sl)
    assert spy == {"rope": 1, "attention": 1}
    _close(qo, reference.rope(q, k, cos, sin, pos)[0], ROPE_TOL[torch.float32])
    _close(out, reference.attention(qa, ka, va, sl), ATTN_TOL[torch.float32])


@pytest.mark.parametrize("mode", ["torch", "auto"])
def test_dispatch_torch_and_cpu_auto_use_reference(monkeypatch, spy, mode):
    if mode == "auto":
        if ON_CUDA:
            pytest.skip("auto picks Triton for CUDA tensors")
        monkeypatch.delenv("TZD_KERNELS", raising=False)
    else:
        monkeypatch.setenv("TZD_KERNELS", mode)
    _, q, k, cos, sin, pos = _rope_inputs(ROPE_CASES[0], torch.float32)
    kernels.rope(q, k, cos, sin, pos)
    qa, ka, va, sl, _ = _attn_inputs(ATTN_CASES[0], torch.float32)
    kernels.attention(qa, ka, va, seqlens=sl)
    assert spy == {"rope": 0, "attention": 0}


def test_dispatch_attention_falls_back_where_triton_does_not_apply(monkeypatch, spy):
    monkeypatch.setenv("TZD_KERNELS", "triton")
    q, k, v, sl, _ = _attn_inputs(ATTN_CASES[1], torch.float32)
    kernels.attention(q, k, v, seqlens=sl, causal=True)  # causal: the judge model only
    kernels.attention(q.requires_grad_(True), k, v, seqlens=sl).sum().backward()  # no Triton backward
    assert q.grad is not None
    q48 = torch.randn(1, 2, 3, 48, device=DEVICE)
    kernels.attention(q48, q48, q48)  # head dim 48 is not a kernel size
    mask = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(0)) > 0.5
    mask[..., 0] = True  # every query sees a key
    with torch.no_grad():
        kernels.attention(q, k, v, seqlens=sl, mask=mask.to(DEVICE))  # an explicit mask: the reference only
    assert spy["attention"] == 0
    with torch.no_grad():
        kernels.attention(q, k, v, seqlens=sl)
    assert spy["attention"] == 1


def test_dispatch_block_causal_runs_triton(monkeypatch, spy):
    monkeypatch.setenv("TZD_KERNELS", "triton")
    q, k, v, sl, qb, kb = _block_inputs(BLOCK_CASES[1], torch.float32)
    out = kernels.attention(q, k, v, seqlens=sl, q_blocks=qb, k_blocks=kb)
    assert spy["attention"] == 1
    _close(out, reference.attention(q, k, v, sl, q_blocks=qb, k_blocks=kb), ATTN_TOL[torch.float32])


def test_dispatch_rope_trains_through_triton(monkeypatch, spy):
    monkeypatch.setenv("TZD_KERNELS", "triton")
    _, q, k, cos, sin, pos = _rope_inputs(ROPE_CASES[0], torch.float32)
    q = q.detach().requires_grad_(True)
    qo, _ = kernels.rope(q, k, cos, sin, pos)
    qo.sum().backward()
    assert spy["rope"] == 1 and q.grad is not None


def test_dispatch_rejects_unknown_mode(monkeypatch):
    monkeypatch.setenv("TZD_KERNELS", "cuda")
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="TZD_KERNELS"):
        kernels.attention(q, q, q)


def test_dispatch_without_triton(monkeypatch):
    monkeypatch.setattr(kernels, "_triton", lambda: None)
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    monkeypatch.delenv("TZD_KERNELS", raising=False)
    torch.testing.assert_close(kernels.attention(q, q, q), reference.attention(q, q, q))
    monkeypatch.setenv("TZD_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="triton is not importable"):
        kernels.attention(q, q, q)


# ---- benchmark script ------------------------------------------------------------------------------


@pytest.mark.skipif(ON_CUDA, reason="checks the refusal without CUDA")
def test_bench_refuses_without_cuda():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(root / "bench" / "kernels.py")], capture_output=True, text=True,
                          env=env, cwd=root, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr


# ---- the commit choice (kernels/triton_commit.py against tzd.sampling.rules.select_commits) ----------

@pytest.mark.parametrize(("rows", "P", "threshold", "ties"), [
    (1, 1, False, False), (5, 32, False, False), (7, 33, True, False), (4, 130, True, True), (3, 256, False, True),
])
def test_commit_kernel_matches_the_rule(rows: int, P: int, threshold: bool, ties: bool) -> None:
    """The same positions as the torch rule: counts from the schedule, a threshold (0 on some rows) that
    commits more, rows with few or no masked positions, tied confidences ordered by position."""
    from tzd.sampling import rules

    g = torch.Generator().manual_seed(rows * 1000 + P)
    conf = torch.rand(rows, P, generator=g)
    if ties:  # a few distinct values only: ties everywhere
        conf = (conf * 4).floor() / 4
    is_mask = torch.rand(rows, P, generator=g) < 0.7
    is_mask[0, :] = False if rows > 2 else is_mask[0, :]  # a row with nothing left to commit
    remaining = is_mask.sum(dim=1)
    steps_left = torch.randint(1, 6, (rows,), generator=g)
    count = torch.minimum((-(-remaining // steps_left)).clamp(min=1), remaining)
    thr = torch.where(torch.rand(rows, generator=g) < 0.3, 0.0, torch.rand(rows, generator=g) * 0.8)
    want, _ = rules.select_commits(conf, is_mask, steps_left, thr, threshold, count)
    got = triton_commit.select_commits(conf.to(DEVICE), is_mask.to(DEVICE), count.to(DEVICE),
                                       thr.to(DEVICE) if threshold else None)
    assert got.dtype == torch.bool and torch.equal(got.cpu(), want)


def test_commit_kernel_dispatch(monkeypatch) -> None:
    monkeypatch.setenv("TZD_KERNELS", "triton")
    assert kernels.commit_kernel(torch.zeros(1, device=DEVICE)) is triton_commit.select_commits
    monkeypatch.setenv("TZD_KERNELS", "torch")
    assert kernels.commit_kernel(torch.zeros(1, device=DEVICE)) is None
