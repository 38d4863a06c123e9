"""Packed (varlen) attention, both paths, against the padded reference run row by row.

The ground truth is kernels.reference.attention on each row alone ([1,H,len,D]); the packed torch
reference (the CPU path) and the Triton kernel (TRITON_INTERPRET=1 on CPU, compiled on a CUDA machine)
must match it. Every output is poisoned with NaN first so that an element left unwritten shows.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any triton.jit below is decorated
DEVICE = "cuda" if ON_CUDA else "cpu"

pytest.importorskip("triton", reason="triton is not installed (pip install 'tzd[triton]')")

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from tzd.models.blocks import block_ids  # noqa: E402


def _interpreted(mod, kernel: str) -> bool:
    fn = getattr(mod, kernel)
    return type(getattr(fn, "fn", fn)).__name__ == "InterpretedFunction"


def _load_kernels():
    """kernels.triton_varlen, re-imported (with triton_attention, whose tile loop it calls) if it was first
    imported with the other TRITON_INTERPRET."""
    attn = importlib.import_module("kernels.triton_attention")
    varlen = importlib.import_module("kernels.triton_varlen")
    if _interpreted(attn, "_attn_fwd") == ON_CUDA or _interpreted(varlen, "_varlen_fwd") == ON_CUDA:
        importlib.reload(attn)
        varlen = importlib.reload(varlen)
        kernels._triton.cache_clear()
    return varlen


triton_varlen = _load_kernels()

# fp32 agrees to rounding; bf16/fp16 are judged against the fp32 ground truth (p is rounded before p @ v)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _packed(rows, H, Hk, D, dtype, block=None, seed=0):
    """rows: (q_len, k_len, prompt_len) per row; a row's queries are its last q_len key positions (the
    sampler's window at the end of the sequence) unless q_len > k_len (then they are their own)."""
    gen = torch.Generator().manual_seed(seed)
    lq = torch.tensor([r[0] for r in rows])
    lk = torch.tensor([r[1] for r in rows])
    cu_q = F.pad(lq.cumsum(0), (1, 0)).to(DEVICE, torch.int32)
    cu_k = F.pad(lk.cumsum(0), (1, 0)).to(DEVICE, torch.int32)
    q = torch.randn(int(lq.sum()), H, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(int(lk.sum()), Hk, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(int(lk.sum()), Hk, D, generator=gen).to(DEVICE, dtype)
    qb = kb = None
    if block is not None:
        kbs, qbs = [], []
        for n_q, n_k, prompt in rows:
            ids = block_ids(max(n_q, n_k), prompt, block, DEVICE)[0]
            kbs.append(ids[:n_k])
            qbs.append(ids[n_k - n_q:n_k] if n_q <= n_k else ids[:n_q])
        qb, kb = torch.cat(qbs), torch.cat(kbs)
    return q, k, v, cu_q, cu_k, int(lq.max()), int(lk.max()), qb, kb


def _row_by_row(q, k, v, cu_q, cu_k, scale=None, qb=None, kb=None):
    """The padded reference on each row alone, in fp32: the ground truth."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(cu_q.shape[0] - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if qe == qs or ke == ks:
            continue  # no queries, or no keys: zeros
        blocks = {} if qb is None else {"q_blocks": qb[None, qs:qe], "k_blocks": kb[None, ks:ke]}
        row = reference.attention(q[None, qs:qe].float().transpose(1, 2), k[None, ks:ke].float().transpose(1, 2),
                                  v[None, ks:ke].float().transpose(1, 2), scale=scale, **blocks)
        out[qs:qe] = row[0].transpose(0, 1)
    return out


def _close(actual, expected, dtype):
    assert not actual.isnan().any(), "unwritten elements (NaN poison) or NaN"
    torch.testing.assert_close(actual.float(), expected, rtol=TOL[dtype][0], atol=TOL[dtype][1])


# (rows as (q_len, k_len, prompt_len), H, Hk, D, block, scale). Odd lengths; 16 is the interpreter's tile.
# Rows with no queries, with no keys (their queries get zeros), both empty, a lone token.
CASES = [
    ([(5, 5, 0), (19, 19, 0), (33, 33, 0)], 4, 4, 32, None, None),
    ([(7, 40, 9), (0, 0, 0), (16, 16, 3), (1, 23, 5), (0, 11, 0), (3, 0, 0)], 4, 2, 64, None, 0.3),
    ([(12, 45, 13), (21, 21, 21), (1, 1, 1), (0, 7, 2), (33, 50, 6)], 4, 1, 16, 8, None),
    ([(16, 37, 5), (9, 9, 2), (2, 0, 0)], 2, 1, 128, 4, None),
]


def _case_id(c) -> str:
    rows, H, Hk, D, block, scale = c
    return f"{len(rows)}rows-H{H}Hk{Hk}D{D}-blk{block}-sc{scale}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_matches_row_by_row(case, dtype):
    rows, H, Hk, D, block, scale = case
    q, k, v, cu_q, cu_k, mq, mk, qb, kb = _packed(rows, H, Hk, D, dtype, block)
    got = reference.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, scale, qb, kb)
    assert got.shape == q.shape and got.dtype == dtype
    expected = _row_by_row(q, k, v, cu_q, cu_k, scale, qb, kb)
    _close(got, expected, dtype)
    if block is not None:  # the block ids matter: the bidirectional result differs
        assert not torch.allclose(expected, _row_by_row(q, k, v, cu_q, cu_k, scale), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_row_by_row(case, dtype):
    rows, H, Hk, D, block, scale = case
    q, k, v, cu_q, cu_k, mq, mk, qb, kb = _packed(rows, H, Hk, D, dtype, block)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    got = triton_varlen.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, scale, qb, kb, out=out)
    assert got is out
    _close(got, _row_by_row(q, k, v, cu_q, cu_k, scale, qb, kb), dtype)


def test_triton_never_reads_keys_above_the_diagonal():
    # NaN keys/values in blocks after every query of their row would poison the output if any were
    # loaded: those key tiles must be skipped, not masked.
    rows = [(9, 60, 3), (0, 20, 0), (17, 70, 8), (4, 4, 0)]
    q, k, v, cu_q, cu_k, mq, mk, qb, kb = _packed(rows, 2, 1, 32, torch.float32, block=8, seed=3)
    # the queries are a window at 20..28 of row 0 and 40..56 of row 2, not their rows' ends
    qb = torch.cat((kb[20:29], kb[cu_k[2] + 40:cu_k[2] + 57], kb[cu_k[3]:]))
    expected = _row_by_row(q, k, v, cu_q, cu_k, None, qb, kb)
    k, v = k.clone(), v.clone()
    poisoned = 0
    for b in (0, 2):
        ks, ke = int(cu_k[b]), int(cu_k[b + 1])
        above = torch.zeros(k.shape[0], dtype=torch.bool, device=DEVICE)
        above[ks:ke] = kb[ks:ke] > qb[int(cu_q[b]):int(cu_q[b + 1])].max()
        k[above], v[above] = float("nan"), float("nan")
        poisoned += int(above.sum())
    assert poisoned == 31  # 25 keys of row 0 (whole tiles among them), 6 of row 2
    _close(triton_varlen.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, None, qb, kb), expected, torch.float32)


def test_reference_takes_gradients():
    rows = [(5, 12, 2), (0, 3, 0), (9, 9, 4)]
    q, k, v, cu_q, cu_k, mq, mk, qb, kb = _packed(rows, 2, 1, 16, torch.float32, block=4, seed=1)
    grads = []
    for fn in (lambda *a: reference.varlen_attention(*a, cu_q, cu_k, mq, mk, None, qb, kb),
               lambda *a: _row_by_row(*a, cu_q, cu_k, None, qb, kb)):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        (fn(*leaves) * torch.arange(q.numel(), device=DEVICE).view(q.shape).sin()).sum().backward()
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    q = torch.zeros(0, 2, 16, device=DEVICE)
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert reference.varlen_attention(q, q, q, cu, cu, 0, 0).shape == (0, 2, 16)
    assert triton_varlen.varlen_attention(q, q, q, cu, cu, 0, 0).shape == (0, 2, 16)


def test_bad_arguments_name_the_field():
    q, k, v, cu_q, cu_k, mq, mk, qb, kb = _packed(CASES[2][0], 4, 1, 16, torch.float32, block=8)
    for fn in (reference.varlen_attention, triton_varlen.varlen_attention):
        with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k"):
            fn(q, k, v, cu_q, cu_k[:-1], mq, mk)
        with pytest.raises(ValueError, match="max_seqlen_q must be an int"):
            fn(q, k, v, cu_q, cu_k, float(mq), mk)
        with pytest.raises(ValueError, match="k_blocks must be integer block ids"):
            fn(q, k, v, cu_q, cu_k, mq, mk, None, qb, kb[:-1])
        with pytest.raises(ValueError, match="go together"):
            fn(q, k, v, cu_q, cu_k, mq, mk, None, qb)
        with pytest.raises(ValueError, match="Hk must divide H"):
            k3 = torch.zeros(k.shape[0], 3, k.shape[2], device=DEVICE)
            fn(q, k3, k3, cu_q, cu_k, mq, mk)
    with pytest.raises(ValueError, match="longer than max_seqlen_q"):
        reference.varlen_attention(q, k, v, cu_q, cu_k, mq - 1, mk)
    with pytest.raises(ValueError, match="cu_seqlens_k must rise from 0"):
        reference.varlen_attention(q, k, v, cu_q, cu_k + 1, mq, mk)


@pytest.fixture
def spy(monkeypatch):
    calls = {"varlen": 0}
    impl = triton_varlen.varlen_attention

    def counted(*a, **kw):
        calls["varlen"] += 1
        return impl(*a, **kw)

    monkeypatch.setattr(triton_varlen, "varlen_attention", counted)
    return calls


def test_dispatch(monkeypatch, spy):
    q, k, v, cu_q, cu_k, mq, mk, qb, kb = _packed(CASES[2][0], 4, 1, 16, torch.float32, block=8)
    expected = _row_by_row(q, k, v, cu_q, cu_k, None, qb, kb)
    monkeypatch.setenv("TZD_KERNELS", "triton")
    _close(kernels.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, q_blocks=qb, k_blocks=kb), expected, torch.float32)
    assert spy["varlen"] == 1
    kernels.varlen_attention(q.requires_grad_(True), k, v, cu_q, cu_k, mq, mk).sum().backward()  # no Triton backward
    assert spy["varlen"] == 1 and q.grad is not None
    monkeypatch.setenv("TZD_KERNELS", "torch")
    _close(kernels.varlen_attention(q.detach(), k, v, cu_q, cu_k, mq, mk, q_blocks=qb, k_blocks=kb), expected,
           torch.float32)
    assert spy["varlen"] == 1
