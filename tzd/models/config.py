"""The model configuration shared by every backend (stored in a checkpoint's config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

BACKENDS = ("smdm", "litgpt")
ATTENTION_KINDS = ("bidirectional", "block_causal")
BLOCK_ALIGNS = ("prompt", "absolute")
DECODE_RULES = ("tzd", "llada2")
ROUTER_SCORES = ("softmax", "sigmoid")


@dataclass
class ModelConfig:
    backend: str = "smdm"
    vocab_size: int = 4096
    context_len: int = 256
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
    # the family's own sampling rule (tzd.sampling.plan): "tzd" (LLaDA's: `steps` spread over the blocks,
    # a threshold commits what reaches it) or "llada2" (LLaDA2's published generate(): `steps` per block and
    # each block's schedule from the block length, a threshold commits what exceeds it, the canvas runs to
    # the end of its last block)
    decode_rule: str = "tzd"
    # Qwen3-layout families (SDAR): an RMSNorm on each head's queries and keys before RoPE, and a head size
    # that need not be n_embd // n_head
    qk_norm: bool = False
    head_size: int | None = None
    # Switches for the public LLaMA-like families (LLaDA, Dream), off for TZD's own models:
    qkv_bias: bool = False  # biases on the q/k/v projections (Dream, Qwen2 layout)
    tie_embeddings: bool = False  # the output head reuses the token embedding matrix
    logit_shift: bool = False  # position i's logits come from the output at i-1, the first's from itself (Dream)
    # Mixture of experts (LLaDA2, LLaDA-MoE, SDAR-MoE; tzd.models.moe). 0 experts: a dense SwiGLU in every
    # layer. Else layers >= first_k_dense_replace route each token to n_experts_per_token of n_experts
    # SwiGLU experts of width moe_intermediate_size (the first layers stay dense, of intermediate_size),
    # plus n_shared_experts always-on experts (one SwiGLU of n_shared_experts * moe_intermediate_size).
    n_experts: int = 0
    n_experts_per_token: int = 1
    moe_intermediate_size: int | None = None
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    router_score: str = "softmax"  # scores from the router logits (fp32): softmax over experts or sigmoid each
    router_bias: bool = False  # a per-expert bias added to the scores to choose experts (not to weight them)
    # group-limited routing (DeepSeek-V3, LLaDA2): experts in n_group equal groups; a token picks the
    # topk_group groups with the highest sum of their two best (biased) scores, then its experts among them
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True  # the chosen experts' weights divided by their sum (+ 1e-20)
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend={self.backend!r}: must be one of {', '.join(BACKENDS)}")
        for name in ("vocab_size", "context_len", "n_layer", "n_head", "n_embd"):
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
        if self.decode_rule not in DECODE_RULES:
            raise ValueError(f"model.decode_rule={self.decode_rule!r}: must be one of {', '.join(DECODE_RULES)}")
        if self.decode_rule == "llada2" and not (self.block_causal and self.block_align == "absolute"):
            raise ValueError("model.decode_rule=llada2: LLaDA2's rule is for block-causal models with blocks from "
                             "position 0 (model.attention=block_causal, model.block_align=absolute)")
        if int(self.diffusion_block) < 1:
            raise ValueError(f"model.diffusion_block={self.diffusion_block}: must be >= 1")
        if self.block_causal and self.causal:
            raise ValueError("model.attention=block_causal is a diffusion layout: not with model.causal")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"model.rotary_fraction={self.rotary_fraction}: must be in (0, 1]")
        self._check_moe()

    def _check_moe(self) -> None:
        if int(self.n_experts) < 0:
            raise ValueError(f"model.n_experts={self.n_experts}: must be >= 0 (0 = dense)")
        if not self.n_experts:
            return
        if self.backend != "smdm":
            raise ValueError(f"model.backend={self.backend!r}: mixture of experts is a switch of the smdm backend")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        E, k, G, g = int(self.n_experts), int(self.n_experts_per_token), int(self.n_group), int(self.topk_group)
        if not 1 <= k <= E:
            raise ValueError(f"model.n_experts_per_token={k}: must be in 1..n_experts ({E})")
        if G < 1 or E % G:
            raise ValueError(f"model.n_group={G}: must be >= 1 and divide model.n_experts={E}")
        if G > 1 and E // G < 2:
            raise ValueError(f"model.n_group={G}: a group's score sums its top 2 experts; {E // G} per group")
        if not 1 <= g <= G or k > g * (E // G):
            raise ValueError(f"model.topk_group={g}: must be in 1..n_group ({G}) and hold n_experts_per_token ({k}) "
                             "experts")
        if self.router_score not in ROUTER_SCORES:
            raise ValueError(f"model.router_score={self.router_score!r}: must be one of {', '.join(ROUTER_SCORES)}")
        if not 0 <= int(self.first_k_dense_replace) <= self.n_layer:
            raise ValueError(f"model.first_k_dense_replace={self.first_k_dense_replace}: must be in 0..n_layer")
        for name in ("moe_intermediate_size", "n_shared_experts"):
            if int(getattr(self, name)) < (1 if name == "moe_intermediate_size" else 0):
                raise ValueError(f"model.{name}={getattr(self, name)}: must be >= "
                                 f"{1 if name == 'moe_intermediate_size' else 0}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer` routes to experts (else a dense SwiGLU of intermediate_size)."""
        return bool(self.n_experts) and layer >= self.first_k_dense_replace

    def unrouted_params(self) -> int:
        """Parameters a token does not use: the weights of the experts it is not routed to, in every
        MoE layer (the model's parameter count minus this is its active parameter count)."""
        unused = int(self.n_experts) - int(self.n_experts_per_token)
        return self._moe_layers() * unused * 3 * self.n_embd * int(self.moe_intermediate_size or 0)

    def _moe_layers(self) -> int:
        return max(0, self.n_layer - self.first_k_dense_replace) if self.n_experts else 0

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
        d = dict(d)
        if "block_size" in d:  # the key's name before it was context_len (every checkpoint written until then)
            old = d.pop("block_size")
            if d.setdefault("context_len", old) != old:
                raise ValueError(f"model config: block_size={old} and context_len={d['context_len']} disagree "
                                 "(block_size is the old name of context_len: give one)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)
