"""The forward masking process and the NELBO loss."""

from __future__ import annotations

import torch

from tzd.diffusion import EPS, diffusion_loss, forward_process


def test_masked_fraction_matches_p() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (512, 256), generator=g)
    noisy, masked, p = forward_process(ids, mask_id=4, generator=g)
    assert torch.equal(noisy == 4, masked)
    assert torch.equal(noisy[~masked], ids[~masked])
    # p is constant along each sequence and lies in [eps, 1]
    assert torch.all(p == p[:, :1]) and p.min() >= EPS and p.max() <= 1
    frac = masked.float().mean(dim=1)
    # per-sequence masked fraction tracks its p (binomial std <= 0.5/sqrt(256) ~ 0.031)
    assert (frac - p[:, 0]).abs().max() < 0.15
    assert abs(float(frac.mean() - p[:, 0].mean())) < 0.01
    # t ~ U(0,1): the mean of p is about (1 + eps) / 2
    assert abs(float(p[:, 0].mean()) - 0.5) < 0.05


def test_loss_is_sum_of_ce_over_p_divided_by_bl() -> None:
    g = torch.Generator().manual_seed(1)
    B, L, V = 3, 7, 11
    logits = torch.randn(B, L, V, generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    p = torch.rand(B, 1, generator=g).expand(B, L) * 0.9 + 0.1
    expected = 0.0
    for b in range(B):
        for i in range(L):
            if masked[b, i]:
                ce = -torch.log_softmax(logits[b, i], dim=-1)[targets[b, i]]
                expected += float(ce / p[b, i])
    assert abs(float(diffusion_loss(logits, targets, masked, p)) - expected / (B * L)) < 1e-5
