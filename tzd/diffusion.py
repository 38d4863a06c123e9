"""The masked-diffusion objectives: forward masking process, NELBO loss, evaluation bound.

Bidirectional models (SMDM / LLaDA): one noise level t ~ U(0,1) per sequence, every token masked with
p = (1-eps) t + eps, the loss is the sum over masked positions of CE / p divided by B*T (nats/token).

Block-causal models (block diffusion, BD3-LM): the sequence is cut into blocks and every block gets its
own noise level, so each block is a small masked-diffusion problem conditioned on the clean blocks
before it, exactly as the sampler meets it (earlier blocks committed, the current one partly masked).
The block boundaries follow the serving layout (tzd.models.blocks.block_ids): per sequence a "prompt
length" P ~ U{0..T-1} is drawn and the blocks are cut from position 0 up to P, then from P on. Positions
< P are noised like the rest; P only aligns the blocks with those a served prompt of P tokens produces
(a prompt's last block may be shorter, and generated blocks start right after it). Every block is
trained in one forward over BD3-LM's two-stream input [noised ; clean] (2T columns, positions 0..T-1
for both halves), whose mask lets noised block b see itself and the clean blocks < b, and the clean
stream see itself block-causally; only the noised half's logits are computed. The weighting is the
bidirectional one (sum of CE / p over masked positions, divided by B*T), so both report the same NELBO
bound in nats/token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tzd.models.blocks import block_ids, two_stream_mask
from tzd.models.config import ModelConfig
from tzd.models.context import ForwardContext

EPS = 1e-3


def _draw_device(ids: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Where the noise is drawn: on the generator's device (the trainer's step generators live on the
    CPU, so a step draws the same noise on any accelerator), else beside the ids."""
    return generator.device if generator is not None else ids.device


def forward_process(ids: torch.Tensor, mask_id: int, eps: float = EPS,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each token independently with p = (1-eps)*t + eps, t ~ U(0,1) per sequence.

    Returns (noisy ids, boolean mask of masked positions, p per position [B,T]).
    """
    B, T = ids.shape
    dev = _draw_device(ids, generator)
    t = torch.rand(B, device=dev, generator=generator).to(ids.device)
    p = ((1 - eps) * t + eps)[:, None].expand(B, T)
    masked = torch.rand(B, T, device=dev, generator=generator).to(ids.device) < p
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked, p


@dataclass
class BlockNoise:
    """One draw of the block forward process for a batch [B,T]."""

    noisy: torch.Tensor  # [B,T] ids with the masked positions set to the mask id
    masked: torch.Tensor  # [B,T] bool
    p: torch.Tensor  # [B,T] masking probability of each position (its block's)
    blocks: torch.Tensor  # [B,T] block id of each position (the serving layout of a drawn prompt length)


def block_forward_process(ids: torch.Tensor, mask_id: int, block: int, eps: float = EPS,
                          generator: torch.Generator | None = None, prompt_len: torch.Tensor | None = None,
                          align: str = "prompt") -> BlockNoise:
    """Per sequence a prompt length P ~ U{0..T-1} (the block layout) and per block t ~ U(0,1); each token
    is masked with its block's p = (1-eps)*t + eps. The draws have shapes independent of P, so a seed
    always gives the same noise. Given `prompt_len` (task rows: a real prompt), the blocks are laid out
    from it (`align` as the model's) and only what follows it is masked."""
    B, T = ids.shape
    dev = _draw_device(ids, generator)
    if prompt_len is None:
        prompt_len = torch.randint(0, T, (B,), device=dev, generator=generator).to(ids.device)
        response = torch.ones(B, T, dtype=torch.bool, device=ids.device)
    else:
        prompt_len = prompt_len.to(ids.device)
        response = torch.arange(T, device=ids.device)[None] >= prompt_len[:, None]
    blocks = block_ids(T, prompt_len, block, align=align)
    # at most ceil(P/block) + ceil((T-P)/block) <= T // block + 2 blocks per row
    t = torch.rand(B, T // block + 2, device=dev, generator=generator).to(ids.device)
    p = ((1 - eps) * t + eps).gather(1, blocks)
    masked = (torch.rand(B, T, device=dev, generator=generator).to(ids.device) < p) & response
    return BlockNoise(torch.where(masked, torch.full_like(ids, mask_id), ids), masked, p, blocks)


def two_stream_logits(model: nn.Module, ids: torch.Tensor, noisy: torch.Tensor,
                      blocks: torch.Tensor) -> torch.Tensor:
    """Logits [B,T,V] of the noised tokens, every block against the clean blocks before it, in one forward
    over [noisy ; ids] (positions 0..T-1 twice, tzd.models.blocks.two_stream_mask)."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)
    ctx = ForwardContext(positions=pos.repeat(2)[None].expand(B, -1), attn_mask=two_stream_mask(blocks),
                         output_positions=pos[None].expand(B, -1))
    return model(torch.cat((noisy, ids), dim=1), ctx)


def block_diffusion_loss(model: nn.Module, ids: torch.Tensor, mask_id: int, block: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """BD3-LM's NELBO estimate (nats/token) for a block-causal model with blocks of `block` tokens."""
    d = block_forward_process(ids, mask_id, block, generator=generator)
    return diffusion_loss(two_stream_logits(model, ids, d.noisy, d.blocks), ids, d.masked, d.p)


def sft_forward_process(ids: torch.Tensor, prompt_len: torch.Tensor, mask_id: int, eps: float = EPS,
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """forward_process over the response only (LLaDA's SFT): positions < prompt_len[b] are never masked."""
    noisy, masked, p = forward_process(ids, mask_id, eps=eps, generator=generator)
    response = torch.arange(ids.shape[1], device=ids.device)[None] >= prompt_len.to(ids.device)[:, None]
    masked = masked & response
    return torch.where(masked, noisy, ids), masked, p


def sft_loss(model: nn.Module, ids: torch.Tensor, prompt_len: torch.Tensor, mask_id: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """LLaDA's SFT objective: the NELBO of the response given the clean prompt, in nats per response
    token (the sum of CE / p over masked response positions, divided by the number of response tokens)."""
    noisy, masked, p = sft_forward_process(ids, prompt_len, mask_id, generator=generator)
    return response_nelbo(model(noisy), ids, masked, p, prompt_len)


def block_sft_loss(model: nn.Module, ids: torch.Tensor, prompt_len: torch.Tensor, mask_id: int, block: int,
                   align: str = "prompt", generator: torch.Generator | None = None) -> torch.Tensor:
    """sft_loss for a block-causal model: the blocks laid out from the real prompt as the sampler lays them,
    one t per block (BD3-LM), only response positions masked, every block against the clean blocks before
    it in one two-stream forward."""
    d = block_forward_process(ids, mask_id, block, generator=generator, prompt_len=prompt_len, align=align)
    return response_nelbo(two_stream_logits(model, ids, d.noisy, d.blocks), ids, d.masked, d.p, prompt_len)


def response_nelbo(logits: torch.Tensor, ids: torch.Tensor, masked: torch.Tensor, p: torch.Tensor,
                   prompt_len: torch.Tensor) -> torch.Tensor:
    """Sum of CE / p over the masked positions, per response token (what follows each row's prompt)."""
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
    response_tokens = (ids.shape[1] - prompt_len.to(ids.device)).sum().clamp(min=1)
    return (ce / p[masked]).sum() / response_tokens


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                   p: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of CE / p, divided by B*L: an unbiased NELBO estimate in nats/token."""
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    return (ce / p[masked]).sum() / targets.numel()


def autoregressive_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (nats/token) for the causal judge."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())


def training_loss(model: nn.Module, ids: torch.Tensor, mask_id: int, cfg: ModelConfig,
                  generator: torch.Generator | None = None, prompt_len: torch.Tensor | None = None) -> torch.Tensor:
    """The loss a training step minimises: NLL for the causal judge, the NELBO for diffusion models
    (block diffusion's for block-causal ones); with `prompt_len` (task rows: prompt then response) the
    NELBO of the response given the prompt (diffusion models only)."""
    if prompt_len is not None:
        if cfg.causal:
            raise ValueError("task rows (data=task) train diffusion models only: set model.causal=false")
        if cfg.block_causal:
            return block_sft_loss(model, ids, prompt_len, mask_id, cfg.diffusion_block, align=cfg.block_align,
                                  generator=generator)
        return sft_loss(model, ids, prompt_len, mask_id, generator=generator)
    if cfg.causal:
        return autoregressive_loss(model(ids), ids)
    if cfg.block_causal:
        return block_diffusion_loss(model, ids, mask_id, cfg.diffusion_block, generator=generator)
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
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
             mask_id: int, cfg: ModelConfig,
             seed: int = 1234, draws: int = 1) -> EvalResult:
    """Mean validation loss with a fixed-seed generator, so a checkpoint always gets the same number.

    For diffusion models this is the NELBO bound (the block-diffusion one for block-causal models)
    averaged over `draws` maskings of each batch. A batch may be (ids, prompt_len): task rows, whose
    figure is the response's NELBO per response token.
    """
    causal = cfg.causal
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        ids, prompt_len = batch if isinstance(batch, tuple) else (batch, None)
        for d in range(draws):
            g = torch.Generator(device=ids.device).manual_seed(seed + 1000 * i + d)
            loss = training_loss(model, ids, mask_id, cfg, generator=g, prompt_len=prompt_len)
            if prompt_len is not None:
                n = int((ids.shape[1] - prompt_len).sum())
            else:
                n = ids.numel() if not causal else ids[:, 1:].numel()
            total += float(loss) * n
            count += n
    model.train(was_training)
    return EvalResult(nats_per_token=total / max(count, 1), tokens=count // max(draws, 1))
