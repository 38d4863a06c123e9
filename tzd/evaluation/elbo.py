"""The Monte-Carlo ELBO of a continuation given a prompt, as LLaDA's own lm-eval adapter estimates it.

A masked-diffusion model has no exact log-likelihood; its ELBO is

    log p(target | prompt) >= -E_l E_mask [ L / l * sum over the l masked positions of CE ]

with l (the number of masked target tokens) uniform in 1..L (L = len(target)), the masked positions a
uniform random subset of the target and the prompt always clean. LLaDA's `get_log_likelihood`
(eval_llada.py) draws the l of one batch of `mc_batch` samples stratified (one uniform k, then l_i = k,
k + L/b, ... wrapped into 1..L: each l_i is marginally uniform and the batch covers 1..L evenly), averages
the weighted losses over the batch and over mc_num / mc_batch batches; this does the same. The draws come
from `generator` only, so a fixed seed gives a fixed figure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (ids [B,T], first) -> logits [B,T-first,V] of positions first..T-1 (position i predicts token i): only the
# target's rows of the output head are computed (LLaDA-8B's vocabulary makes the rest gigabytes)
Logits = Callable[[torch.Tensor, int], torch.Tensor]


def model_logits(model: torch.nn.Module) -> Logits:
    """A TZD model (smdm or litgpt) as a Logits function, through its ForwardContext's output_positions."""
    from tzd.models.context import ForwardContext  # noqa: PLC0415 - keep this module's import light

    def logits(ids: torch.Tensor, first: int) -> torch.Tensor:
        wanted = torch.arange(first, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return model(ids, ForwardContext(output_positions=wanted))

    return logits


def mask_counts(target_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """l_i for one batch of samples: LLaDA's stratified draw, each in 1..target_len."""
    k = int(torch.randint(1, target_len + 1, (), generator=generator))
    x = torch.round(torch.linspace(float(k), k + (batch - 1) * (target_len / batch), steps=batch)).long()
    return ((x - 1) % target_len) + 1


def mask_positions(counts: torch.Tensor, target_len: int, generator: torch.Generator) -> torch.Tensor:
    """[B, target_len] bool: row i has counts[i] masked positions, a uniform random subset (the rank of each
    position in a random permutation below counts[i]; LLaDA shuffles a prefix mask with randperm, the same law)."""
    ranks = torch.rand(len(counts), target_len, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def elbo_loglikelihood(logits_fn: Logits, prompt: list[int], target: list[int], mask_id: int, mc_num: int,
                       mc_batch: int, generator: torch.Generator, device: torch.device | str = "cpu",
                       cfg_scale: float = 0.0) -> float:
    """-(the Monte-Carlo estimate of the diffusion loss of `target` after `prompt`): an estimate of a lower
    bound of log p(target | prompt), in nats. `mc_num` samples, `mc_batch` per forward (mc_num a multiple).
    `cfg_scale` > 0: classifier-free guidance as LLaDA applies it (the prompt masked for the unconditional pass)."""
    if not target:
        raise ValueError("target: nothing to score (the continuation encodes to no tokens)")
    if mc_num % mc_batch:
        raise ValueError(f"mc_num: {mc_num} must be a multiple of mc_batch ({mc_batch})")
    n_prompt, n = len(prompt), len(target)
    clean = torch.tensor(prompt + target, dtype=torch.long, device=device)[None].expand(mc_batch, -1)
    answer = clean[:, n_prompt:]
    losses = []
    for _ in range(mc_num // mc_batch):
        counts = mask_counts(n, mc_batch, generator)
        masked = mask_positions(counts, n, generator).to(device)  # [B, n]: of the target only
        noisy = torch.cat((clean[:, :n_prompt], torch.where(masked, mask_id, answer)), dim=1)
        logits = guided_logits(logits_fn, noisy, n_prompt, mask_id, cfg_scale)  # [B, n, V]
        ce = F.cross_entropy(logits[masked].float(), answer[masked], reduction="none")
        weights = (n / counts.to(device, torch.float32))[:, None].expand(-1, n)[masked]
        losses.append((ce * weights).sum() / mc_batch)
    return -float(torch.stack(losses).mean())


def guided_logits(logits_fn: Logits, ids: torch.Tensor, n_prompt: int, mask_id: int, cfg_scale: float) -> torch.Tensor:
    """The model's logits, with classifier-free guidance: un + (scale + 1) * (cond - un), the unconditional
    pass seeing the prompt masked."""
    if cfg_scale <= 0:
        return logits_fn(ids, n_prompt)
    un = ids.clone()
    un[:, :n_prompt] = mask_id
    cond, uncond = logits_fn(torch.cat((ids, un)), n_prompt).float().chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)
