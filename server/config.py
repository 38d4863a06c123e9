"""Command-line flags of `python -m server`; every flag can also come from a TZD_* environment variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CHECKPOINT = "models/shakespeare-small"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the repository root in a source checkout
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ServerConfig:
    checkpoint: Path = Path(DEFAULT_CHECKPOINT)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 16
    max_queue: int = 256
    max_tokens_limit: int = 256
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 1 << 20
    threads: int | None = None
    model_name: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    sse_keepalive: float = 15.0
    request_timeout: float | None = None

    @property
    def served_name(self) -> str:
        """The model id of /v1/models: --model-name, else the checkpoint's name (a run's, for run/last)."""
        path = self.checkpoint.resolve()
        return self.model_name or (path.parent.name if path.name in ("last", "best") else path.name)


def resolve_checkpoint(path: str | Path) -> Path:
    """A relative path that does not exist from the cwd is tried from the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PACKAGE_ROOT / p if (PACKAGE_ROOT / p).exists() else p


def _device(v: str) -> str:
    if v in DEVICES or v.startswith("cuda:"):
        return v
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(DEVICES)} (or cuda:N), got {v!r}")


def _dtype(v: str) -> str:
    if v in DTYPES:
        return v
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)}, got {v!r}")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(v: str) -> Any:
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {v!r}") from None
        if x <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {v!r}")
        return x
    parse.__name__ = kind.__name__
    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if v in choices:
            return v
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {v!r}")
    return parse


def _port(v: str) -> int:
    p = _positive(int)(v)
    if p > 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {v!r}")
    return p


# (flag, type, default, help); the env var is TZD_ + the flag upper-cased with dashes as underscores
FLAGS: list[tuple[str, Callable[[str], Any], Any, str]] = [
    ("--checkpoint", str, DEFAULT_CHECKPOINT, "checkpoint directory (relative paths also from the repo root)"),
    ("--host", str, "127.0.0.1", "interface to bind"),
    ("--port", _port, 8000, "TCP port"),
    ("--device", _device, "auto", "auto (CUDA where there is one), cpu, cuda, cuda:N"),
    ("--dtype", _dtype, "auto", "auto (CUDA: bf16 weights; CPU with bf16 units: bf16 autocast, linear layers "
                             "stored in bf16, the rest fp32), float32, bfloat16, float16"),
    ("--max-batch-size", _positive(int), 16, "requests denoised together in one step"),
    ("--max-queue", _positive(int), 256, "requests waiting for a slot before 429"),
    ("--max-tokens-limit", _positive(int), 256, "largest max_tokens a request may ask for"),
    ("--shutdown-timeout", _positive(float), 30.0, "seconds to finish in-flight requests after SIGTERM"),
    ("--max-body-bytes", _positive(int), 1 << 20, "largest request body (413 above)"),
    ("--threads", _positive(int), None, "torch CPU threads (default: torch's, one per core; 1 where other busy "
                                        "processes share the cores)"),
    ("--sse-keepalive", _positive(float), 15.0, "seconds between keep-alive comments on a stream (while it waits "
                                                "for a slot or between slow steps)"),
    ("--request-timeout", _positive(float), None, "seconds a request may take (from arrival); past it, it ends "
                                                  "with finish_reason \"timeout\" and the text so far (default: "
                                                  "none; a request's own `timeout` can only shorten it)"),
    ("--model-name", str, None, "model id in /v1/models (default: the checkpoint directory's name)"),
    ("--log-level", str, "info", "debug, info, warning, error"),
    ("--log-format", _choice("text", "json"), "text", "text, or json: one JSON object per line (access lines "
                                                      "carry request_id, method, route, status, tokens, times)"),
]


def env_name(flag: str) -> str:
    return "TZD_" + flag.lstrip("-").upper().replace("-", "_")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The parser; defaults come from `environ` where a TZD_* variable is set."""
    parser = argparse.ArgumentParser(prog="python -m server", description="Serve a TZD masked-diffusion model "
                                     "over HTTP (native /generate with step streaming, OpenAI /v1).")
    for flag, kind, default, help_ in FLAGS:
        env = env_name(flag)
        if env in environ:
            try:
                default = kind(environ[env])
            except (argparse.ArgumentTypeError, ValueError) as e:
                parser.error(f"{env}={environ[env]!r}: {e}")
        parser.add_argument(flag, type=kind, default=default, help=f"{help_} [env {env}; default {default}]")
    env_keys = [k for k in environ.get("TZD_API_KEY", "").split(",") if k.strip()]
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require `Authorization: Bearer KEY` on /generate and /v1/* (repeatable) "
                             "[env TZD_API_KEY, comma-separated]")
    parser.set_defaults(env_api_keys=env_keys)
    parser.add_argument("--api-key-file", default=environ.get("TZD_API_KEY_FILE"), metavar="PATH",
                        help="file with one API key per line (# comments) [env TZD_API_KEY_FILE]")
    return parser


def read_key_file(path: str) -> list[str]:
    """API keys from a file: one a line; blank lines and # comments are skipped."""
    lines = Path(path).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags over environment over defaults; exits with a usage error naming the bad flag or variable."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    keys = list(args.api_key if args.api_key is not None else args.env_api_keys)
    if args.api_key_file:
        try:
            keys += read_key_file(args.api_key_file)
        except OSError as e:
            parser.error(f"--api-key-file {args.api_key_file}: {e.strerror or e}")
        if not keys:
            parser.error(f"--api-key-file {args.api_key_file}: no keys in the file")
    if any(not k.strip() for k in keys):
        parser.error("--api-key: must not be empty")
    return ServerConfig(
        checkpoint=resolve_checkpoint(args.checkpoint), host=args.host, port=args.port, device=args.device,
        dtype=args.dtype, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit, api_keys=tuple(k.strip() for k in keys),
        shutdown_timeout=args.shutdown_timeout, max_body_bytes=args.max_body_bytes, threads=args.threads,
        model_name=args.model_name,
        log_level=args.log_level, log_format=args.log_format, sse_keepalive=args.sse_keepalive,
        request_timeout=args.request_timeout)
