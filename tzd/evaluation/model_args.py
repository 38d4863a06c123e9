"""`--model_args` of the tzd lm-eval model: the adapter's own options, and every SamplingParams field by name."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from tzd.sampling import SamplingParams

DEFAULT_SEED = 1234  # lm-eval's own default seed: generation with temperature and the ELBO draws reproduce
DEFAULT_MAX_TOKENS = 256  # lm-eval's default max_gen_toks, used when neither model_args nor the task give one
SAMPLER_FIELDS = tuple(SamplingParams.model_fields)


@dataclass
class AdapterOptions:
    """The options that are not SamplingParams fields."""

    pretrained: str = ""
    device: str = "auto"
    dtype: str = "auto"  # server.runtime's choice: bf16 on a GPU, bf16 autocast on a CPU that has the units
    batch_size: int = 16  # generate_until: rows denoised at once
    mc_num: int = 128  # loglikelihood: Monte-Carlo samples per request (LLaDA's default)
    mc_batch: int = 32  # of them, rows per forward (mc_num must be a multiple)
    check_greedy: bool = True  # loglikelihood's is_greedy by a greedy decode; False skips it (reports False)
    threads: int | None = None
    max_model_len: int | None = None  # serve at most this many positions (a public model's context can be huge)
    deterministic: bool = False  # the batch-invariant path (server --deterministic on)
    max_batch_size: Any = None  # lm-eval passes it to every model; batch_size is what counts here
    sampler: dict[str, Any] = field(default_factory=dict)  # the SamplingParams fields given


OPTION_NAMES = tuple(f.name for f in fields(AdapterOptions) if f.name != "sampler")


def parse_model_args(kwargs: dict[str, Any]) -> AdapterOptions:
    """Split lm-eval's model_args (already typed by lm-eval's parser) into options and sampler fields; an unknown
    name or a bad value raises ValueError naming it."""
    opts = AdapterOptions()
    for name, value in kwargs.items():
        if name in SAMPLER_FIELDS:
            opts.sampler[name] = value
        elif name in OPTION_NAMES:
            setattr(opts, name, value)
        else:
            raise ValueError(f"model_args: unknown argument {name!r}; the tzd model takes {', '.join(OPTION_NAMES)} "
                             f"and the SamplingParams fields {', '.join(SAMPLER_FIELDS)}")
    if not opts.pretrained:
        raise ValueError("model_args: pretrained=DIR (a TZD checkpoint or a LLaDA/Dream directory) is required")
    if isinstance(opts.batch_size, str):
        if opts.batch_size == "auto" or opts.batch_size.startswith("auto:"):
            opts.batch_size = AdapterOptions.batch_size  # no memory probing: the default
        elif opts.batch_size.isdigit():
            opts.batch_size = int(opts.batch_size)
    for name in ("batch_size", "mc_num", "mc_batch"):
        value = getattr(opts, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model_args: {name} must be a positive integer, got {value!r}")
    if opts.mc_num % opts.mc_batch:
        raise ValueError(f"model_args: mc_num ({opts.mc_num}) must be a multiple of mc_batch ({opts.mc_batch})")
    opts.sampler.setdefault("seed", DEFAULT_SEED)
    sampling_params(opts.sampler, opts.sampler.get("max_tokens", DEFAULT_MAX_TOKENS))  # fail fast on a bad value
    return opts


def sampling_params(fields_given: dict[str, Any], max_tokens: int, **task: Any) -> SamplingParams:
    """SamplingParams from the model_args fields, `max_tokens` and the task's generation fields (`task`: only
    where model_args do not set them); a bad value raises ValueError naming the field."""
    merged = {**{k: v for k, v in task.items() if v is not None}, **fields_given, "max_tokens": max_tokens}
    try:
        return SamplingParams.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "model_args"
        raise ValueError(f"model_args: {name}: {err['msg']} (got {err.get('input')!r})") from None
