"""Which layers of a model are quantized, and replacing them one by one as their weights arrive.

The linear layers of attention and MLP always, and a mixture of experts' stacked expert weights
(tzd.models.moe.Experts -> QuantizedExperts; its router stays float: it is small and chooses the experts);
the output head (`output` in SMDM, `lm_head` in litgpt) and the token embeddings (`tok_embeddings`, `wte`)
where QuantConfig.head asks. A loader hands every tensor it reads to Quantizer.take: the tensor of a
quantized layer is quantized at once and the layer replaced in the model (built on the meta device or real),
so no float copy of it outlives that call (an Experts module's three stacks are each quantized as they
come, and the module replaced once all three are in).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tzd.models.moe import Experts
from tzd.quant.config import QuantConfig
from tzd.quant.embedding import QuantizedEmbedding
from tzd.quant.experts import QuantizedExperts, QuantizedStack
from tzd.quant.linear import Int8Linear, QuantizedLinear, quantize_linear

HEAD_NAMES = ("output", "lm_head")


def _targets(model: nn.Module, cfg: QuantConfig) -> dict[str, nn.Module]:
    """name -> the float module to replace."""
    out = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, nn.Linear) and (cfg.head or leaf not in HEAD_NAMES):
            out[name] = module
        elif isinstance(module, Experts):  # nearly all of an MoE model's bytes
            out[name] = module
        elif isinstance(module, nn.Embedding) and cfg.head:
            out[name] = module
    return out


class Quantizer:
    """Replaces a model's quantized layers as their tensors are handed over (see the module doc).

    `linear_dtype`: what the quantized linear layers compute in (and return), and what the experts' weights are
    dequantized to (the dtype float experts would be stored in); `embedding_dtype`: what the embedding rows come
    out in (the residual stream's dtype)."""

    def __init__(self, model: nn.Module, cfg: QuantConfig, linear_dtype: torch.dtype,
                 embedding_dtype: torch.dtype) -> None:
        self.model, self.cfg = model, cfg
        self.linear_dtype, self.embedding_dtype = linear_dtype, embedding_dtype
        self.todo = _targets(model, cfg)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # a layer's tensors until it has them all
        self.stacks: dict[str, dict[str, QuantizedStack]] = {}  # an Experts module's, each quantized as it came
        # modules that share one weight (a tied head and embedding): the first tensor serves them all
        by_weight: dict[int, list[str]] = {}
        for name, module in self.todo.items():
            if not isinstance(module, Experts):  # never tied
                by_weight.setdefault(id(module.weight), []).append(name)
        self.tied = {name: names for names in by_weight.values() for name in names}

    def keys(self) -> list[str]:
        """The state-dict keys this quantizer takes (each module's weight, and bias where it has one)."""
        return [f"{name}.{p}" for name, m in self.todo.items() for p, _ in m.named_parameters(recurse=False)]

    def take(self, key: str, tensor: torch.Tensor) -> bool:
        """Quantize `tensor` if `key` belongs to a quantized layer (True: the caller drops it)."""
        name, _, attr = key.rpartition(".")
        if name not in self.todo:
            return False
        module = self.todo[name]
        if isinstance(module, Experts):
            # quantized now, not when its two siblings arrive: one float stack in flight, not three
            stacks = self.stacks.setdefault(name, {})
            stacks[attr] = QuantizedStack(tensor, self.cfg.method, self.cfg.group_size, self.linear_dtype)
            if len(stacks) == 3:  # w1, w3, w2
                del self.stacks[name], self.todo[name]
                self._set(name, QuantizedExperts(**stacks))
            return True
        parts = self.pending.setdefault(name, {})
        parts[attr] = tensor
        needed = {p for p, _ in module.named_parameters(recurse=False)}
        if needed <= set(parts):
            del self.pending[name]
            self._replace(name, parts)
        return True

    def _set(self, name: str, new: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent), leaf, new)

    def _replace(self, name: str, parts: dict[str, torch.Tensor]) -> None:
        weight, bias = parts["weight"], parts.get("bias")
        group = self.cfg.group_size
        # linear layers first, so that an int8 embedding tied to an int8 head shares its table
        names = sorted(self.tied[name], key=lambda n: isinstance(self.todo[n], nn.Embedding))
        head: QuantizedLinear | None = None
        for n in names:
            if isinstance(self.todo[n], nn.Embedding):
                table = (head.weight_int8, head.scale) if isinstance(head, Int8Linear) else None
                new: nn.Module = QuantizedEmbedding(weight, self.cfg.method, group, self.embedding_dtype, table)
                new.tied = len(names) > 1  # counted once in count_weights
            else:
                new = head = quantize_linear(weight, bias if n == name else None, self.cfg.method, group,
                                             self.linear_dtype)
            self._set(n, new)
            del self.todo[n]

    def finish(self) -> None:
        """Check that every quantized layer got its tensors."""
        if self.todo or self.pending or self.stacks:
            raise ValueError(f"quantization: no weights were handed over for {sorted(self.todo)[:5]}")


def quantize_model(model: nn.Module, cfg: QuantConfig, linear_dtype: torch.dtype,
                   embedding_dtype: torch.dtype) -> nn.Module:
    """Quantize a loaded float model in place, layer by layer (each float weight freed as its layer goes)."""
    quantizer = Quantizer(model, cfg, linear_dtype, embedding_dtype)
    for key in quantizer.keys():
        name, _, attr = key.rpartition(".")
        if name in quantizer.todo:  # a tied alias is gone once its twin was replaced
            quantizer.take(key, getattr(quantizer.todo[name], attr).detach())
    quantizer.finish()
    return model


def count_weights(model: nn.Module) -> int:
    """Parameters of the model as its float checkpoint has them, quantized layers included (a tied head and
    embedding once)."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
        elif isinstance(module, QuantizedEmbedding) and not module.tied:
            total += module.num_embeddings * module.embedding_dim
        elif isinstance(module, QuantizedStack):
            E, N, K = module.shape
            total += E * N * K
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights as held: float parameters, and the quantized layers' tables and scales
    (each tensor once: a tied head and embedding share theirs). Buffers like RoPE tables are not weights."""
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding, QuantizedStack)):
            tensors.update({id(b): b for b in module.buffers(recurse=False)})
    return sum(t.numel() * t.element_size() for t in tensors.values())
