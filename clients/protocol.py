"""The wire schema: the one definition of requests, responses and stream events (server and SDK share it).

Pure pydantic: importing this module never imports torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4


class SamplingParams(BaseModel):
    """How to denoise one request. Checks here need no model; `tzd.sampling.plan` adds the context checks."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(64, ge=1, description="number of tokens to generate (the canvas length)")
    steps: int | None = Field(None, ge=1, description="denoising steps (upper bound with threshold); "
                                                      "None = max_tokens")
    block_length: int | None = Field(None, ge=1, description="semi-autoregressive block length; "
                                                             "None = min(32, max_tokens)")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="confidence-threshold parallel decoding")
    cache: Literal["none", "prefix", "dual"] = "none"
    cfg_scale: float = Field(0.0, ge=0.0, description="classifier-free guidance scale; 0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63, description="None = random")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v: object) -> object:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _non_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else self.max_tokens

    def resolved_block_length(self) -> int:
        return self.block_length if self.block_length is not None else min(32, self.max_tokens)
