"""The model configuration shared by every backend (stored in a checkpoint's config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

BACKENDS = ("smdm", "litgpt")
ATTENTION_KINDS = ("bidirectional", "block_causal")
BLOCK_ALIGNS = ("prompt", "absolute")


@dataclass
class ModelConfig:
    backend: str = "smdm"
    vocab_size: int = 4096
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query attention
    n_embd: int = 384
    intermediate_size: int | None = None  # None = SwiGLU's 8/3 * n_embd rounded up to 64
    rope_base: float = 10000.0
    rotary_fraction: float = 1.0  # share of each head's dims that RoPE rotates
    norm_eps: float = 1e-5
    causal: bool = False  # True builds the same network as a left-to-right model (the judge)
    # "bidirectional": every position sees every other; "block_causal" (block diffusion, BD3-LM/SDAR): a
    # position sees its own block of `diffusion_block` positions and every earlier block (tzd.models.blocks)
    attention: str = "bidirectional"
    diffusion_block: int = 32
    # where blocks start at serving time: "prompt" (TZD's: the prompt is its own leading span, generated
    # blocks count from the first generated token) or "absolute" (SDAR's: multiples of diffusion_block from
    # position 0, so the first generated block also holds the prompt's tail)
    block_align: str = "prompt"
    # Qwen3-layout families (SDAR): an RMSNorm on each head's queries and keys before RoPE, and a head size
    # that need not be n_embd // n_head
    qk_norm: bool = False
    head_size: int | None = None
    # Switches for the public LLaMA-like families (LLaDA, Dream), off for TZD's own models:
    qkv_bias: bool = False  # biases on the q/k/v projections (Dream, Qwen2 layout)
    tie_embeddings: bool = False  # the output head reuses the token embedding matrix
    logit_shift: bool = False  # position i's logits come from the output at i-1, the first's from itself (Dream)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend={self.backend!r}: must be one of {', '.join(BACKENDS)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)}: must be >= 1")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_size is not None and int(self.head_size) < 2:
            raise ValueError(f"model.head_size={self.head_size}: must be >= 2")
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.intermediate_size is None:
            self.intermediate_size = -(-(8 * self.n_embd // 3) // 64) * 64
        if self.backend != "smdm" and (self.qkv_bias or self.tie_embeddings or self.logit_shift or self.qk_norm
                                       or self.head_size is not None):
            raise ValueError(f"model.backend={self.backend!r}: qkv_bias, tie_embeddings, logit_shift, qk_norm and "
                             "head_size are switches of the smdm backend")
        if self.logit_shift and self.causal:
            raise ValueError("model.logit_shift applies to diffusion models only, not with model.causal")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention={self.attention!r}: must be one of {', '.join(ATTENTION_KINDS)}")
        if self.block_align not in BLOCK_ALIGNS:
            raise ValueError(f"model.block_align={self.block_align!r}: must be one of {', '.join(BLOCK_ALIGNS)}")
        if int(self.diffusion_block) < 1:
            raise ValueError(f"model.diffusion_block={self.diffusion_block}: must be >= 1")
        if self.block_causal and self.causal:
            raise ValueError("model.attention=block_causal is a diffusion layout: not with model.causal")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"model.rotary_fraction={self.rotary_fraction}: must be in (0, 1]")

    @property
    def block_causal(self) -> bool:
        return self.attention == "block_causal"

    @property
    def denoise_block(self) -> int | None:
        """The block length sampling must use: a block-causal model's own blocks; None = any (bidirectional)."""
        return int(self.diffusion_block) if self.block_causal else None

    @property
    def head_dim(self) -> int:
        return int(self.head_size) if self.head_size is not None else self.n_embd // self.n_head

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head: an even number <= head_dim."""
        return max(2, int(self.head_dim * self.rotary_fraction) // 2 * 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)
