"""SamplingParams (the wire schema's) plus the checks that need the prompt and the model's context."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from clients.protocol import SamplingParams

__all__ = ["RequestPlan", "SamplingParams", "SamplingParamsError", "plan"]


class SamplingParamsError(ValueError):
    """A request that cannot run on this model; `field` names the offending parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class RequestPlan:
    """A request's resolved parameters: every None filled in, every range checked."""

    params: SamplingParams
    prompt_len: int
    max_tokens: int
    steps: int
    block_length: int
    num_blocks: int
    seed: int
    first_block: int = 0  # length of block 0 when it differs (absolute block alignment); 0 = block_length

    def block_start(self, block: int) -> int:
        """Offset (from the first generated token) where `block` starts."""
        if block == 0 or not self.first_block:
            return block * self.block_length
        return self.first_block + (block - 1) * self.block_length

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.max_tokens


def plan(params: SamplingParams, prompt_len: int, context: int, model_block: int | None = None,
         absolute_blocks: bool = False) -> RequestPlan:
    """Resolve and check `params` for a prompt of `prompt_len` tokens on a model with `context` positions.

    `model_block`: the block size of a block-causal model; its blocks are the model's, so block_length
    defaults to it (or max_tokens when shorter) and any other value is refused. `absolute_blocks`: the
    model's blocks start at multiples of model_block from position 0 (SDAR), so block 0 is the rest of the
    block the prompt ends in.

    Steps are spread over blocks: block b gets steps // num_blocks steps, the first steps % num_blocks
    blocks one more (capped at the block's length). Where steps divides evenly this is LLaDA's rule.
    """
    if prompt_len < 0:
        raise SamplingParamsError("prompt", "must be a list of token ids")
    g = params.max_tokens
    if prompt_len + g > context:
        raise SamplingParamsError(
            "max_tokens", f"prompt ({prompt_len} tokens) + max_tokens ({g}) = {prompt_len + g} exceeds the "
                          f"model's context of {context} tokens; max_tokens must be <= {max(context - prompt_len, 0)}")
    steps = params.resolved_steps()
    block = params.resolved_block_length()
    if model_block is not None:
        if params.block_length is not None and params.block_length not in (model_block, min(model_block, g)):
            raise SamplingParamsError(
                "block_length", f"this block-diffusion model denoises blocks of {model_block} tokens (its "
                                f"diffusion_block); omit block_length or give {min(model_block, g)}, got {block}")
        block = min(model_block, g)
    if block > g:
        raise SamplingParamsError("block_length", f"must be in [1, max_tokens={g}], got {block}")
    if steps > g:
        raise SamplingParamsError("steps", f"must be in [1, max_tokens={g}], got {steps}")
    first = 0
    if model_block is not None and absolute_blocks and prompt_len % model_block:
        first = min(model_block - prompt_len % model_block, g)
    num_blocks = 1 + math.ceil((g - first) / block) if first else math.ceil(g / block)
    if steps < num_blocks:
        raise SamplingParamsError("steps", f"must be >= the number of blocks (ceil({g}/{block}) = {num_blocks}), "
                                           f"got {steps}")
    seed = params.seed if params.seed is not None else secrets.randbelow(2**62)
    return RequestPlan(params, prompt_len, g, steps, block, num_blocks, seed, first)
