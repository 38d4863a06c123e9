"""The `tzd` model of lm-evaluation-harness: TZD checkpoints and the LLaDA/Dream directories tzd loads.

    python -m tzd.evaluation --model tzd --model_args pretrained=DIR,max_tokens=256,block_length=32 --tasks ...

generate_until runs the real sampler (tzd.sampling.generate, `batch_size` rows at once, in the serving
precision of server.runtime); loglikelihood is the Monte-Carlo ELBO LLaDA's own adapter reports
(tzd.evaluation.elbo); loglikelihood_rolling sums it over windows of the model's context.
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models first: get_model loads them only into an empty registry
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from server.runtime import inference, load_runtime
from tzd.evaluation.elbo import elbo_loglikelihood, model_logits
from tzd.evaluation.model_args import DEFAULT_MAX_TOKENS, SAMPLER_FIELDS, parse_model_args, sampling_params
from tzd.hf.chat import ChatTemplateError
from tzd.sampling import SamplingParams, generate

log = logging.getLogger(__name__)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any stop string (lm-eval's `until`)."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


@register_model("tzd")
class TZDLM(LM):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.opts = parse_model_args(kwargs)
        device = self.opts.device or "auto"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda:0 when none is given; its hf model falls back likewise
            log.warning("device %s: CUDA is not available here; running on the CPU", device)
            device = "cpu"
        self.runtime = load_runtime(self.opts.pretrained, device, self.opts.dtype, threads=self.opts.threads,
                                    max_model_len=self.opts.max_model_len, deterministic=self.opts.deterministic)
        self.config = self.runtime.loaded.model_config
        if self.config.causal:
            raise ValueError(f"pretrained: {self.opts.pretrained} is an autoregressive (causal) checkpoint; the tzd "
                             "model evaluates masked-diffusion models")
        self.model = self.runtime.loaded.model
        self.tok = self.runtime.loaded.tokenizer
        self._device = self.runtime.device
        self._chat_prompts: set[str] = set()  # prompts this model rendered: encoded without added special tokens
        self._ignored_keys: set[str] = set()

    # ---- what lm-eval asks of a model -----------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return self.runtime.context

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat.source if self.tok.chat is not None else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.tok.chat is None:
            raise ValueError(f"apply_chat_template: {self.opts.pretrained} has no chat template (tokenizer_config.json "
                             "chat_template or chat_template.jinja); run without --apply_chat_template")
        try:
            text = self.tok.chat.render(chat_history, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:
            raise ValueError(str(e)) from None
        self._chat_prompts.add(text)
        return text

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in its results' config beside the model_args."""
        return {"model_num_parameters": self.runtime.params, "model_dtype": self.runtime.dtype_name,
                "model_device": str(self._device), "model_context": self.max_length}

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        prompts, params, untils, limits = [], [], [], []
        cut = 0
        for context, gen_kwargs in (r.args for r in requests):
            p, until, limit = self._request_params(gen_kwargs)
            ids = self._encode(context)
            room = self.max_length - p.max_tokens
            if room < 1:
                raise ValueError(f"max_tokens: {p.max_tokens} leaves no room for a prompt in the model's context of "
                                 f"{self.max_length} tokens")
            if len(ids) > room:
                ids, cut = ids[-room:], cut + 1
            prompts.append(ids)
            params.append(p)
            untils.append(until)
            limits.append(limit)
        if cut:
            log.warning("%d of %d prompts cut from the left to fit the model's context of %d tokens with max_tokens",
                        cut, len(prompts), self.max_length)
        bar = tqdm(total=len(prompts), desc="tzd generate_until", disable=disable_tqdm)

        def done(_i: int, ev: Any) -> None:
            if ev.done:
                bar.update(1)

        with inference(self.runtime):
            results = generate(self.model, prompts, params, mask_id=self.tok.mask_id, eos_id=self.tok.eos_ids,
                               tokenizer=self.tok, max_batch=self.opts.batch_size, on_step=done)
        bar.close()
        out = []
        for req, r, until, limit in zip(requests, results, untils, limits, strict=True):
            text = r.text or ""
            if limit is not None and len(r.tokens) > limit:  # the task's max_gen_toks below the canvas
                text = self.tok.decode(r.tokens[:limit])
            text = cut_at_stop(text, until)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._check_likelihood_model()
        out = []
        for req in tqdm(requests, desc="tzd loglikelihood", disable=disable_tqdm):
            prompt, target = self._fit_pair(*self._encode_pair(*req.args))
            ll = self._elbo(prompt, target)
            greedy = self._is_greedy(prompt, target) if self.opts.check_greedy else False
            self.cache_hook.add_partial("loglikelihood", req.args, (ll, greedy))
            out.append((ll, greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        self._check_likelihood_model()
        out = []
        for req in tqdm(requests, desc="tzd loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                self.tok.encode_chat(text), self._prefix_id(), max_seq_len=self.max_length - 1, context_len=1))
            total = sum(self._elbo(ctx, cont) for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    # ---- generation ----------------------------------------------------------------------------------

    def _request_params(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str], int | None]:
        """One request's SamplingParams, its `until` strings and the token limit to cut at (the task's
        max_gen_toks where model_args chose a longer canvas; None when the canvas is the limit).

        The canvas is model_args' max_tokens, else the task's max_gen_toks, else 256 (lm-eval's default).
        SamplingParams fields in the task's generation kwargs (or --gen_kwargs) apply where model_args do not
        set them; do_sample=false means temperature 0."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = kw.pop("max_gen_toks", None) or kw.pop("max_tokens", None)
        do_sample = kw.pop("do_sample", None)
        task = {k: kw.pop(k) for k in list(kw) if k in SAMPLER_FIELDS}
        if do_sample is False:
            task["temperature"] = 0.0
        elif "temperature" in task:
            task["temperature"] = float(task["temperature"])
        if kw and not set(kw) <= self._ignored_keys:
            self._ignored_keys |= set(kw)
            log.warning("generation kwargs %s have no meaning for the tzd model and are ignored", sorted(kw))
        max_tokens = self.opts.sampler.get("max_tokens") or (int(max_gen) if max_gen else DEFAULT_MAX_TOKENS)
        limit = int(max_gen) if max_gen and int(max_gen) < max_tokens else None
        return sampling_params(self.opts.sampler, max_tokens, **task), until, limit

    def _encode(self, text: str) -> list[int]:
        """A prompt this model's chat template rendered holds its special tokens already: none are added."""
        return self.tok.encode_chat(text) if text in self._chat_prompts else self.tok.encode(text)

    # ---- likelihood ----------------------------------------------------------------------------------

    def _check_likelihood_model(self) -> None:
        if self.config.block_causal:
            raise ValueError(f"loglikelihood: {self.opts.pretrained} is a block-diffusion (block-causal) model; its "
                             "ELBO needs every block scored after clean earlier blocks, which this estimator does not "
                             "do. generate_until tasks work")

    def _prefix_id(self) -> int:
        """The token an empty context conditions on (lm-eval's prefix token): BOS, else the first EOS."""
        bos = self.tok.special.bos
        return bos if bos is not None else self.tok.eos_ids[0]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as LLaDA's adapter splits them: trailing spaces of the context move to
        the continuation, whole = enc(context + continuation), the continuation its part after enc(context)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        chat = context in self._chat_prompts
        enc = self.tok.encode_chat if chat else self.tok.encode
        whole, ctx = enc(context + continuation), enc(context)
        target = whole[len(ctx):]
        return (ctx or [self._prefix_id()]), target

    def _fit_pair(self, prompt: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        if not target:
            raise ValueError("loglikelihood: the continuation encodes to no tokens")
        if len(target) >= self.max_length:
            raise ValueError(f"loglikelihood: a continuation of {len(target)} tokens does not fit the model's context "
                             f"of {self.max_length} tokens with its prompt")
        if len(prompt) + len(target) > self.max_length:
            log.warning("loglikelihood: prompt cut from the left to fit the model's context of %d tokens",
                        self.max_length)
            prompt = prompt[len(prompt) + len(target) - self.max_length:]
        return prompt, target

    def _elbo(self, prompt: list[int], target: list[int]) -> float:
        """The ELBO with the draws of a generator seeded afresh per request: a request's figure does not depend
        on the requests before it."""
        gen = torch.Generator().manual_seed(int(self.opts.sampler["seed"]))
        with inference(self.runtime):
            return elbo_loglikelihood(model_logits(self.model), prompt, target, self.tok.mask_id, self.opts.mc_num,
                                      self.opts.mc_batch, gen, self._device,
                                      cfg_scale=float(self.opts.sampler.get("cfg_scale", 0.0)))

    def _is_greedy(self, prompt: list[int], target: list[int]) -> bool:
        """LLaDA's suffix_greedy_prediction: the continuation denoised from all-masked one token per step,
        the most confident first, over one block; greedy when that gives the continuation exactly."""
        n = len(target)
        p = SamplingParams(max_tokens=n, steps=n, block_length=n, temperature=0.0,
                           cfg_scale=float(self.opts.sampler.get("cfg_scale", 0.0)), seed=0)
        with inference(self.runtime):
            (r,) = generate(self.model, [prompt], p, mask_id=self.tok.mask_id)
        return r.tokens == target


__all__ = ["TZDLM", "cut_at_stop"]
