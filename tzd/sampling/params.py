"""A request's plan: the core's own sampling parameters (DecodeParams) and everything resolved against the
prompt and the model (RequestPlan), made once by `plan`.

The wire schema (clients.protocol.SamplingParams, pydantic) checks each field's type and range where a
request comes in; `plan` converts it into the core's records and makes the checks that need the prompt
and the model's context. The core never reads the wire schema after that.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from tzd.sampling.infill import GAP, Layout

if TYPE_CHECKING:
    from clients.protocol import SamplingParams

__all__ = ["DEFAULT_BLOCK_LENGTH", "DecodeParams", "RequestPlan", "SamplingParamsError", "plan"]

DEFAULT_BLOCK_LENGTH = 32  # LLaDA's (the wire schema's description says the same; a test holds them equal)


class SamplingParamsError(ValueError):
    """A request that cannot run on this model; `field` names the offending parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class DecodeParams:
    """How a request is denoised, as the core reads it (the wire schema's fields of the same names; its
    lengths, steps and seed are resolved into RequestPlan)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    remasking: str = "low_confidence"  # or "random"
    threshold: float | None = None
    entropy_bound: float | None = None
    early_exit: bool = True
    cache: str = "none"  # "prefix" | "dual"
    cfg_scale: float = 0.0
    priority: int = 0
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0

    @classmethod
    def of(cls, params: SamplingParams) -> DecodeParams:
        """The core's copy of the wire schema's (already validated) fields."""
        values = {f.name: getattr(params, f.name) for f in fields(cls)}
        values["stop"] = tuple(values["stop"])
        return cls(**values)


@dataclass(frozen=True)
class RequestPlan:
    """A request's resolved parameters: every None filled in, every range checked."""

    params: DecodeParams
    prompt_len: int
    max_tokens: int
    steps: int
    block_length: int
    num_blocks: int
    seed: int
    first_block: int = 0  # length of block 0 when it differs (absolute block alignment); 0 = block_length
    layout: Layout | None = None  # an infill's canvas (fixed text between gaps) and suffix; None = all masks
    # masked positions of each block at the start (a block's length, less an infill's fixed text), and
    # each block's rank among the blocks that have any: steps are spread over those (plan())
    block_open: tuple[int, ...] = ()
    block_rank: tuple[int, ...] = ()
    block_budgets: tuple[int, ...] = ()  # each block's step budget (plan())
    # LLaDA2's rule: the commits at each step of a block (from the block length, whatever the block holds);
    # empty: TZD's schedule (the block's masked positions spread over its budget, rules.schedule_count)
    block_schedule: tuple[int, ...] = ()
    threshold: float | None = None  # the rule's threshold as the commit reads it (>=; LLaDA2's > as the next float)
    visible: int = 0  # the client's max_tokens: LLaDA2's canvas runs on to the end of its last block

    @cached_property
    def masked(self) -> int:
        """Positions the sampler fills: max_tokens, or an infill's gaps."""
        return sum(self.block_open)

    @property
    def suffix_len(self) -> int:
        return len(self.layout.suffix) if self.layout is not None else 0

    @property
    def early_exit(self) -> bool:
        """An EOS in the committed left part ends the request; never an infill's (its EOS is padding)."""
        return self.params.early_exit and self.layout is None

    @cached_property
    def active_blocks(self) -> int:
        """Blocks with masked positions: the ones steps are spread over."""
        return self.block_rank[-1] + (self.block_open[-1] > 0)

    def masked_after(self, block: int) -> int:
        """Masked positions, at the start, of the blocks after `block` (nothing right of the current block
        is committed, so the block is done once no more than these are masked)."""
        return self._masked_after[block]

    @cached_property
    def _masked_after(self) -> tuple[int, ...]:  # the step reads it for every request: summed once
        return tuple(sum(self.block_open[b + 1:]) for b in range(len(self.block_open)))

    def block_start(self, block: int) -> int:
        """Offset (from the first generated token) where `block` starts."""
        if block == 0 or not self.first_block:
            return block * self.block_length
        return self.first_block + (block - 1) * self.block_length

    @cached_property
    def total_len(self) -> int:
        """The row: prompt + canvas + suffix."""
        return self.prompt_len + self.max_tokens + self.suffix_len


def blocks_open(fill: np.ndarray, starts: list[int]) -> tuple[int, ...]:
    """Masked positions of each block of the canvas `fill` (GAP where masked), blocks starting at `starts`."""
    bounds = [*starts, len(fill)]
    return tuple(int((fill[a:b] == GAP).sum()) for a, b in zip(bounds, bounds[1:], strict=False))


def plan(params: SamplingParams, prompt_len: int, context: int, model_block: int | None = None,
         absolute_blocks: bool = False, layout: Layout | None = None, rule: str = "tzd") -> RequestPlan:
    """Resolve and check `params` for a prompt of `prompt_len` tokens on a model with `context` positions.

    `model_block`: the block size of a block-causal model; its blocks are the model's, so block_length
    defaults to it (or max_tokens when shorter) and any other value is refused. `absolute_blocks`: the
    model's blocks start at multiples of model_block from position 0 (SDAR), so block 0 is the rest of the
    block the prompt ends in.

    `layout`: an infill (tzd.sampling.infill): the canvas is its fill (max_tokens becomes its length),
    followed by its suffix; steps default to its gaps' total. Block-causal models cannot see a suffix.

    Steps are spread over blocks: block b gets steps // num_blocks steps, the first steps % num_blocks
    blocks one more (capped at the block's length). Where steps divides evenly this is LLaDA's rule. An
    infill's blocks that hold only fixed text take no step and do not count.

    `rule` "llada2" (ModelConfig.decode_rule; a block-causal model with absolute blocks): the published
    LLaDA2 generate()'s semantics. `steps` is per block (default: the block length; at most max_tokens);
    each step of a block commits the positions whose confidence exceeds the threshold when there are at
    least the schedule's count of them, else the schedule's count (from the block length and steps: block
    // steps, the first block % steps steps one more, whatever the block holds), the most confident first;
    the canvas runs on to the end of the block that holds the max_tokens-th position (that block attends to
    all of it) and the client sees the first max_tokens (`visible`).
    """
    if prompt_len < 0:
        raise SamplingParamsError("prompt", "must be a list of token ids")
    if rule == "llada2":
        return _llada2_plan(params, prompt_len, context, model_block)
    g = layout.canvas_len if layout is not None else params.max_tokens
    suffix = len(layout.suffix) if layout is not None else 0
    if layout is not None and model_block is not None:
        raise SamplingParamsError("suffix", "this block-diffusion model attends causally across blocks, so it "
                                            "cannot see text after the generated canvas; infilling needs a "
                                            "bidirectional model")
    if layout is not None and params.cfg_scale > 0:
        raise SamplingParamsError("cfg_scale", "classifier-free guidance masks the prompt only; it is not "
                                               "available with a suffix or an infill")
    if layout is not None and not layout.masked:
        raise SamplingParamsError("infill", "needs at least one gap of >= 1 positions")
    if prompt_len + g + suffix > context:
        field, what = ("suffix", f" + suffix ({suffix})") if suffix else ("max_tokens", "")
        raise SamplingParamsError(
            field, f"prompt ({prompt_len} tokens) + max_tokens ({g}){what} = {prompt_len + g + suffix} exceeds "
                   f"the model's context of {context} tokens; max_tokens must be <= "
                   f"{max(context - prompt_len - suffix, 0)}")
    masked = layout.masked if layout is not None else g
    steps = params.steps if params.steps is not None else masked
    block = params.block_length if params.block_length is not None else min(DEFAULT_BLOCK_LENGTH, g)
    if model_block is not None:
        if params.block_length is not None and params.block_length not in (model_block, min(model_block, g)):
            raise SamplingParamsError(
                "block_length", f"this block-diffusion model denoises blocks of {model_block} tokens (its "
                                f"diffusion_block); omit block_length or give {min(model_block, g)}, got {block}")
        block = min(model_block, g)
    if block > g:
        raise SamplingParamsError("block_length", f"must be in [1, max_tokens={g}], got {block}")
    if steps > masked:
        what = f"the gaps' {masked} positions" if layout is not None else f"max_tokens={g}"
        raise SamplingParamsError("steps", f"must be in [1, {what}], got {steps}")
    first = 0
    if model_block is not None and absolute_blocks and prompt_len % model_block:
        first = min(model_block - prompt_len % model_block, g)
    num_blocks = 1 + math.ceil((g - first) / block) if first else math.ceil(g / block)
    p = RequestPlan(DecodeParams.of(params), prompt_len, g, steps, block, num_blocks, 0, first, layout)
    fill = np.array(layout.fill) if layout is not None else np.full(g, GAP)
    open_ = blocks_open(fill, [p.block_start(b) for b in range(num_blocks)])
    rank = tuple(np.cumsum([0, *(n > 0 for n in open_[:-1])]).tolist())
    active = sum(n > 0 for n in open_)
    if steps < active:
        raise SamplingParamsError("steps", f"must be >= the number of blocks with masked positions "
                                           f"({active}, blocks of {block}), got {steps}")
    seed = params.seed if params.seed is not None else secrets.randbelow(2**62)
    base, extra = divmod(steps, active)
    budgets = tuple(min(base + (1 if r < extra else 0), n) for r, n in zip(rank, open_, strict=True))
    return replace(p, seed=seed, block_open=open_, block_rank=rank, block_budgets=budgets,
                   threshold=params.threshold, visible=g)


def _llada2_plan(params: SamplingParams, prompt_len: int, context: int, model_block: int | None) -> RequestPlan:
    """plan() under LLaDA2's rule (see plan)."""
    if model_block is None:
        raise ValueError("the llada2 rule is for block-causal models (give model_block)")
    B, n = model_block, params.max_tokens
    if params.block_length is not None and params.block_length != B:
        raise SamplingParamsError("block_length", f"this block-diffusion model denoises blocks of {B} tokens (its "
                                                  f"diffusion_block); omit block_length or give {B}")
    end = -(-(prompt_len + n) // B) * B  # the canvas runs to the end of its last block
    if end > context:
        raise SamplingParamsError("max_tokens", f"prompt ({prompt_len} tokens) + max_tokens ({n}), run on to the "
                                                f"end of its block of {B}, = {end} exceeds the model's context of "
                                                f"{context} tokens; max_tokens must be <= "
                                                f"{max((context // B) * B - prompt_len, 0)}")
    g = end - prompt_len
    # the published min(steps, gen_length); past B steps its schedule's counts are 0, steps a block never
    # reaches (the first B commit one each), so at most B
    per_block = min(params.steps if params.steps is not None else B, n, B)
    base, extra = divmod(B, per_block)
    schedule = tuple(base + (1 if i < extra else 0) for i in range(per_block))
    first = min(B - prompt_len % B, g) if prompt_len % B else 0
    num_blocks = 1 + (g - first) // B if first else g // B
    p = RequestPlan(DecodeParams.of(params), prompt_len, g, 0, min(B, g), num_blocks, 0, first)
    open_ = blocks_open(np.full(g, GAP), [p.block_start(b) for b in range(num_blocks)])
    # the steps a block takes at most: until the schedule has committed every position it holds
    reach = np.cumsum(schedule)
    budgets = tuple(int(np.searchsorted(reach, m)) + 1 if m else 0 for m in open_)
    threshold = None
    if params.threshold is not None:  # "exceeds" as ">=" the next float32 up: the commit's own comparison
        threshold = float(np.nextafter(np.float32(params.threshold), np.float32(np.inf)))
    seed = params.seed if params.seed is not None else secrets.randbelow(2**62)
    return replace(p, steps=sum(budgets), seed=seed, block_open=open_, block_rank=tuple(range(num_blocks)),
                   block_budgets=budgets, block_schedule=schedule, threshold=threshold, visible=n)
