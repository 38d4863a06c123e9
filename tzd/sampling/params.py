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

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.max_tokens


def plan(params: SamplingParams, prompt_len: int, context: int, model_block: int | None = None) -> RequestPlan:
    """Resolve and check `params` for a prompt of `prompt_len` tokens on a model with `context` positions.

    `model_block`: the block size of a block-causal model; its blocks are the model's, so block_length
    defaults to it (or max_tokens when shorter) and any other value is refused.

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
    num_blocks = math.ceil(g / block)
    if steps < num_blocks:
        raise SamplingParamsError("steps", f"must be >= the number of blocks (ceil({g}/{block}) = {num_blocks}), "
                                           f"got {steps}")
    seed = params.seed if params.seed is not None else secrets.randbelow(2**62)
    return RequestPlan(params, prompt_len, g, steps, block, num_blocks, seed)
