"""Batch-invariant attention (torch, any device): a row's output does not depend on the rest of its batch.

A batched step pads every row to the batch's longest keys and queries, so the library kernels see
shapes (and masks) that depend on the batch, and they reduce in an order that follows the shape.
Measured on CPU (torch 2.13, the SDPA flash kernel): keys padded from 44 to 48 change a row's bf16
output (the exp-sum's vector tail), padding to a larger multiple of 64 past ~256 keys changes it in
bf16 and fp32 (the kernel's key split is min(S, 512) and its GEMM blocks over it).

Here every reduction has one fixed shape, whatever the batch:
- keys are cut into chunks of KEY_CHUNK from position 0 (the last one padded, masked); each chunk is
  reduced on its own and the chunks are folded in order with an online softmax, so a chunk wholly
  past a row's keys (the batch's padding) adds exact zeros and leaves the row's result bit for bit;
- queries are cut into tiles of QUERY_TILE folded into the batch dimension, so every score and
  value GEMM is [QUERY_TILE, D] x [D, KEY_CHUNK] and [QUERY_TILE, KEY_CHUNK] x [KEY_CHUNK, D];
- the arithmetic is fp32 (bf16/fp16 inputs are exact in fp32), one rounding at the end.
This is the split-KV scheme of vLLM's and SGLang's batch-invariant modes (a fixed split size, not a
fixed number of splits), in plain torch. It is several times the fused SDPA's time on CPU (the online
softmax is several eager passes per chunk; bench/invariance.py); SDPA per 64-key chunk with its
log-sum-exp was no faster, and SDPA over keys padded to its own 512-key split kept rows equal only with
enough queries and pays for the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import block_mask

KEY_CHUNK = 64
QUERY_TILE = 32


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def allowed_keys(B: int, T: int, S: int, device: torch.device, seqlens: torch.Tensor | None, causal: bool,
                 q_blocks: torch.Tensor | None, k_blocks: torch.Tensor | None,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """[B,1,T,S] bool (True = attend): the layout mask (block ids, explicit), key lengths and causality."""
    allowed = block_mask(q_blocks, k_blocks, mask)
    if allowed is None:
        allowed = torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
    if seqlens is not None:
        keep = torch.arange(S, device=device)[None, :] < seqlens.to(device)[:, None]
        allowed = allowed & keep[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
    return allowed.expand(B, 1, T, S)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False, q_blocks: torch.Tensor | None = None,
              k_blocks: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.attention's contract (q [B,H,T,D], k/v [B,Hk,S,D], the same masks), batch-invariant."""
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    g = H // Hk  # GQA: query heads h*g .. h*g+g-1 read KV head h
    scale = D ** -0.5 if scale is None else scale
    allowed = allowed_keys(B, T, S, q.device, seqlens, causal, q_blocks, k_blocks, mask)
    Tp, Sp = _ceil_to(max(T, 1), QUERY_TILE), _ceil_to(max(S, 1), KEY_CHUNK)
    nq, C = Tp // QUERY_TILE, KEY_CHUNK
    # padded queries see nothing (their rows are dropped), padded keys are never seen
    hidden = ~F.pad(allowed, (0, Sp - S, 0, Tp - T)).view(B, 1, 1, nq, QUERY_TILE, Sp)
    # [B*H*nq, QT, D]: every (row, head, query tile) is one GEMM problem of the same shape
    qt = F.pad(q.float() * scale, (0, 0, 0, Tp - T)).reshape(-1, QUERY_TILE, D)
    kf = F.pad(k.float(), (0, 0, 0, Sp - S))
    vf = F.pad(v.float(), (0, 0, 0, Sp - S))
    n = qt.shape[0]

    def per_tile(x: torch.Tensor) -> torch.Tensor:  # a chunk [B,Hk,C,D] for every query tile: [n, C, D]
        return x[:, :, None].expand(B, Hk, g * nq, C, D).reshape(n, C, D)

    m = torch.full((n, QUERY_TILE, 1), float("-inf"), device=q.device)
    denom = torch.zeros_like(m)
    acc = torch.zeros((n, QUERY_TILE, D), device=q.device)
    s = torch.empty((n, QUERY_TILE, C), device=q.device)
    for c0 in range(0, Sp, C):
        torch.bmm(qt, per_tile(kf[:, :, c0:c0 + C]).mT, out=s)
        s.view(B, Hk, g, nq, QUERY_TILE, C).masked_fill_(hidden[..., c0:c0 + C], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf for rows that saw nothing yet
        alpha = torch.exp(m - m_ref)  # 1 where this chunk changes nothing (exact: x * 1 + 0 == x)
        s.sub_(m_ref).exp_()
        denom = denom * alpha + s.sum(-1, keepdim=True)
        acc = torch.baddbmm(acc * alpha, s, per_tile(vf[:, :, c0:c0 + C]))
        m = m_new
    out = acc / torch.where(denom > 0, denom, 1.0)  # a query that sees no key gets zeros, as SDPA gives
    return out.view(B, H, Tp, D)[:, :, :T].to(q.dtype)
