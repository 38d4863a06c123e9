"""Settings of `python -m server`: one pydantic model, read from flags, then TZD_* variables, then defaults.

Each setting is written once, as a field of ServerOptions (type, default, checks, help); pydantic-settings
makes the command line (`--max-batch-size`, `--help`) and reads the environment (`TZD_MAX_BATCH_SIZE`).
ServerConfig is what the server runs with: the same fields, the API keys loaded (with their limits).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    EnvSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources.utils import parse_env_vars

from server.keys import ApiKey, KeyFileError, read_key_file
from tzd.quant import GROUP_SIZES, QuantConfig

DEFAULT_CHECKPOINT = "models/shakespeare-small"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the repository root in a source checkout
ENV_PREFIX = "TZD_"
PROG = "python -m server"
Positive = Annotated[int, Field(gt=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A relative path that does not exist from the cwd is tried from the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PACKAGE_ROOT / p if (PACKAGE_ROOT / p).exists() else p


class ServerOptions(BaseModel):
    """Serve a TZD masked-diffusion model over HTTP (native /generate with step streaming, OpenAI /v1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: Path = Field(Path(DEFAULT_CHECKPOINT), description="checkpoint directory (relative paths also "
                                                                   "from the repo root)")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    device: str = Field("auto", description="auto (CUDA where there is one), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (CUDA: bf16 weights; CPU with bf16 units: bf16 autocast, linear layers stored "
                            "in bf16, the rest fp32), float32, bfloat16, float16")
    quantization: Literal["int8", "int4", "fp8"] | None = Field(
        None, description="weight-only quantization of the linear layers and the experts' stacked weights, done "
                          "while the checkpoint loads: int8 (a scale per output channel), int4 (a scale and zero "
                          "point per --quantization-group-size inputs), fp8 (e4m3; CUDA GPUs of compute capability "
                          ">= 8.9 only). Unset: float weights")
    quantization_group_size: int = Field(
        64, description="inputs per int4 scale (smaller: closer to the float model, more bytes)")
    quantize_head: Literal["on", "off"] = Field(
        "off", description="on: quantize the output head and the token embeddings too (on a small model they "
                           "hold a large share of the bytes; they are also the most sensitive layers)")
    deterministic: Literal["on", "off"] = Field(
        "off", description="on: batch-invariant kernels (GEMMs over fixed row tiles, attention over fixed key "
                           "chunks), so a request's tokens at temperature 0 or for a given seed are the same "
                           "whatever it is batched with; off (default): the libraries' fastest kernels, whose "
                           "last bits follow the batch's shape, so a near-tie can flip under load (4 of 16 mixed "
                           "requests in bf16). Off by default because on costs 36% of tokens/s at batch 16 on "
                           "CPU in fp32 and 26% in bf16 autocast (bench/results/invariance.json)")
    max_batch_size: Positive = Field(16, description="requests denoised together in one step")
    max_num_batched_tokens: Positive | None = Field(
        None, description="columns one step may run: a request costs its canvas (prompt + max_tokens); the "
                          "first in line waits until it fits (unset: only --max-batch-size limits a step). A "
                          "request larger than the whole budget runs alone, once nothing else runs")
    max_queue: Positive = Field(256, description="requests waiting for a slot before 429")
    kv_cache_memory: str | None = Field(
        None, description="memory of the paged KV cache: GiB (e.g. 2 or 0.25), or a percentage of the free "
                          "device memory (e.g. 40%: CUDA's free memory after the model; available RAM on CPU). "
                          "A request that uses the cache holds the pages of its canvas while it runs; one that "
                          "cannot get them waits, one larger than the whole cache is refused (400). Unset: "
                          "enough pages for every slot to hold a whole context (on CUDA at most half the free "
                          "memory)")
    kv_page_size: Positive = Field(16, description="positions per KV page")
    cuda_graphs: Literal["on", "off"] = Field(
        "off", description="on: replay the cached step inside a block (cache prefix or dual) from CUDA graphs "
                           "captured per shape bucket (rows x window x keys), tokens identical to eager; CUDA "
                           "only. Off by default until measured on a GPU (bench/gpu_check.sh)")
    prefix_cache_mb: float = Field(256.0, ge=0, description="MiB of prompt blocks' keys/values kept for reuse "
                                                            "across requests (block-causal models; 0 = off)")
    max_tokens_limit: Positive = Field(256, description="largest max_tokens a request may ask for")
    max_model_len: Positive = Field(4096, description="most positions (prompt + max_tokens) a request may use; "
                                                      "the model's own context where shorter (public models "
                                                      "declare far longer ones than a step's KV store should "
                                                      "reserve)")
    shutdown_timeout: PositiveSeconds = Field(30.0, description="seconds to finish in-flight requests after "
                                                                "SIGTERM")
    max_body_bytes: Positive = Field(1 << 20, description="largest request body (413 above)")
    threads: Positive | None = Field(None, description="torch CPU threads (unset: torch's, one per core; 1 "
                                                       "where other busy processes share the cores)")
    model_name: str | None = Field(None, description="model id in /v1/models (unset: the checkpoint "
                                                     "directory's name)")
    sse_keepalive: PositiveSeconds = Field(15.0, description="seconds between keep-alive comments on a stream "
                                                             "(while it waits for a slot or between slow steps)")
    request_timeout: PositiveSeconds | None = Field(
        None, description='seconds a request may take from its arrival; past it, it ends with finish_reason '
                          '"timeout" and the text so far (unset: none; a request\'s own `timeout` can only '
                          'shorten it)')
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line "
                                                                     "(access lines carry request_id, method, "
                                                                     "route, status, tokens, times)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v):
            return v
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")

    @field_validator("quantization_group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, GROUP_SIZES))}, got {v}")
        return v

    @field_validator("kv_cache_memory")
    @classmethod
    def _kv_memory(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            number = float(v.strip().removesuffix("%"))
        except ValueError:
            number = -1.0
        if not number > 0 or (v.strip().endswith("%") and number > 100):
            raise ValueError(f"must be GiB (a positive number) or a percentage in (0, 100] like 40%, got {v!r}")
        return v.strip()

    @field_validator("checkpoint")
    @classmethod
    def _resolve(cls, v: Path) -> Path:
        return resolve_checkpoint(v)


class ServerConfig(ServerOptions):
    """What the server runs with: the options and the API keys (none = an open server)."""

    api_keys: tuple[ApiKey, ...] = Field((), repr=False)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:  # plain strings are keys without limits
        return tuple(ApiKey(k) if isinstance(k, str) else k for k in v)

    @property
    def quant_config(self) -> QuantConfig | None:
        """--quantization with its group size and --quantize-head, or None for float weights."""
        if self.quantization is None:
            return None
        return QuantConfig(self.quantization, self.quantization_group_size, self.quantize_head == "on")

    @property
    def served_name(self) -> str:
        """The model id of /v1/models: --model-name, else the checkpoint's name (a run's, for run/last)."""
        path = self.checkpoint.resolve()
        return self.model_name or (path.parent.name if path.name in ("last", "best") else path.name)


class ServerSettings(BaseSettings, ServerOptions):
    """Serve a TZD masked-diffusion model over HTTP (native /generate with step streaming, OpenAI /v1).
    Every flag can also be set by a TZD_* environment variable (flags win)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, cli_prog_name=PROG, cli_kebab_case=True,
                                      cli_hide_none_type=True, cli_avoid_json=True, cli_show_env_vars=True,
                                      cli_exit_on_error=True, cli_implicit_flags=False, frozen=True,
                                      extra="forbid")

    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="require `Authorization: Bearer KEY` on /generate and /v1/* "
                                          "(repeatable; the variable is comma-separated)")
    api_key_file: Path | None = Field(None, description="file of API keys, one a line, each with optional "
                                                        "limits: KEY [name=N] [concurrency=N] [rpm=N] [tpm=N]")

    @field_validator("api_key", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [k for k in v.split(",") if k.strip()] if isinstance(v, str) else v


def _usage_error(message: str) -> SystemExit:
    print(f"usage: {PROG} [-h] [flags]\n{PROG}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _source_of(field: str, argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """Where a bad value came from: `--flag`, `TZD_VAR=value`, or the field."""
    flag = "--" + field.replace("_", "-")
    if any(a == flag or a.startswith(flag + "=") for a in argv):
        return flag
    env = ENV_PREFIX + field.upper()
    return f"{env}={environ[env]!r}" if env in environ else flag


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags over environment over defaults; exits 2 with a usage error naming the bad flag or variable."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ

    class FromArgs(ServerSettings):
        __doc__ = ServerSettings.__doc__

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,  # noqa: ANN001, ANN206
                                       file_secret_settings):
            env = EnvSettingsSource(settings_cls)
            env.env_vars = parse_env_vars(environ, env.case_sensitive, env.env_ignore_empty, env.env_parse_none_str)
            return init_settings, env

    try:
        settings = CliApp.run(FromArgs, cli_args=argv)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else ""
        raise _usage_error(f"{_source_of(field, argv, environ)}: {err['msg']}") from None
    except SettingsError as e:
        raise _usage_error(str(e)) from None
    keys = [ApiKey(k.strip()) for k in settings.api_key]
    if any(not k.key for k in keys):
        raise _usage_error("--api-key: must not be empty")
    if settings.api_key_file is not None:
        try:
            keys += read_key_file(settings.api_key_file)
        except KeyFileError as e:
            raise _usage_error(f"--api-key-file {e}") from None
    options = settings.model_dump(include=set(ServerOptions.model_fields))
    return ServerConfig(**options, api_keys=tuple(keys))
