"""The masked-diffusion objective (SMDM / LLaDA): forward masking process, NELBO loss, evaluation bound."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-3


def forward_process(ids: torch.Tensor, mask_id: int, eps: float = EPS,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each token independently with p = (1-eps)*t + eps, t ~ U(0,1) per sequence.

    Returns (noisy ids, boolean mask of masked positions, p per position [B,T]).
    """
    B, T = ids.shape
    t = torch.rand(B, device=ids.device, generator=generator)
    p = ((1 - eps) * t + eps)[:, None].expand(B, T)
    masked = torch.rand(B, T, device=ids.device, generator=generator) < p
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked, p


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                   p: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of CE / p, divided by B*L: an unbiased NELBO estimate in nats/token."""
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    return (ce / p[masked]).sum() / targets.numel()


def autoregressive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (nats/token) for the causal judge."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())


def training_loss(model: nn.Module, ids: torch.Tensor, mask_id: int, causal: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The loss a training step minimises: the NELBO for diffusion models, NLL for the causal judge."""
    if causal:
        return autoregressive_loss(model(ids), ids)
    noisy, masked, p = forward_process(ids, mask_id, generator=generator)
    return diffusion_loss(model(noisy), ids, masked, p)


@dataclass
class EvalResult:
    nats_per_token: float
    tokens: int

    @property
    def perplexity_bound(self) -> float:
        return math.exp(self.nats_per_token)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor], mask_id: int, causal: bool,
             seed: int = 1234, draws: int = 1) -> EvalResult:
    """Mean validation loss with a fixed-seed generator, so a checkpoint always gets the same number.

    For diffusion models this is the NELBO bound averaged over `draws` maskings of each batch.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, ids in enumerate(batches):
        for d in range(draws):
            g = torch.Generator(device=ids.device).manual_seed(seed + 1000 * i + d)
            loss = training_loss(model, ids, mask_id, causal, generator=g)
            n = ids.numel() if not causal else ids[:, 1:].numel()
            total += float(loss) * n
            count += n
    model.train(was_training)
    return EvalResult(nats_per_token=total / max(count, 1), tokens=count // max(draws, 1))
