"""API keys and their limits: the --api-key-file format, and the per-key counters that enforce the limits.

A key file has one key a line, optionally followed by `name=` (how logs name the key; default: a hash of
it) and limits: `concurrency=` (requests in flight), `rpm=` (requests per minute), `tpm=` (tokens per
minute: prompt + generated tokens of the key's requests that ended in the last 60 s). Blank lines and
`#` comments are skipped:

    sk-team-a  name=team-a  concurrency=4  rpm=120  tpm=50000
    sk-batch   rpm=10
    sk-admin
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import ApiError

LIMITS = ("concurrency", "rpm", "tpm")
WINDOW = 60.0  # seconds: the minute of rpm and tpm


class KeyFileError(ValueError):
    """A key file that cannot be read or has a bad line; the message names the file and the line."""


@dataclass(frozen=True)
class KeyLimits:
    concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class ApiKey:
    key: str = field(repr=False)
    name: str = ""
    limits: KeyLimits = KeyLimits()

    def __post_init__(self) -> None:
        if not self.name:  # never the key itself in a log line
            object.__setattr__(self, "name", "key-" + hashlib.sha256(self.key.encode()).hexdigest()[:8])


def parse_key_line(line: str) -> ApiKey:
    """One key file line (without comment): `KEY [name=NAME] [concurrency=N] [rpm=N] [tpm=N]`."""
    key, *options = line.split()
    if "=" in key:
        raise ValueError(f"expected the key first, got {key!r}")
    name, limits = "", {}
    for opt in options:
        what, sep, value = opt.partition("=")
        if not sep or not value:
            raise ValueError(f"expected NAME=VALUE, got {opt!r}")
        if what == "name":
            name = value
        elif what in LIMITS:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
            limits[what] = int(value)
        else:
            raise ValueError(f"unknown option {what!r} (known: name, {', '.join(LIMITS)})")
    return ApiKey(key, name, KeyLimits(**limits))


def read_key_file(path: str | Path) -> list[ApiKey]:
    """The keys of a key file; KeyFileError names the file and the line of anything wrong."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror or e}") from None
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(parse_key_line(line))
        except ValueError as e:
            raise KeyFileError(f"{path} line {number}: {e}") from None
    if not keys:
        raise KeyFileError(f"{path}: no keys in the file")
    names = [k.name for k in keys]
    if len(set(names)) < len(names):
        raise KeyFileError(f"{path}: two keys named {next(n for n in names if names.count(n) > 1)!r}")
    return keys


class KeyLimitExceeded(ApiError):
    """A key over one of its limits (429): the message names it, Retry-After says when it frees."""

    status, reason = 429, "key_limit"

    def __init__(self, key: ApiKey, limit: str, message: str, retry_after: float) -> None:
        super().__init__(message=f"API key {key.name!r}: {message}", code=f"key_{limit}_limit",
                         headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


@dataclass
class _Usage:
    in_flight: int = 0
    started: deque[float] = field(default_factory=deque)  # when each request of the window started
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (when it ended, its tokens)


class KeyLimiter:
    """The counters behind the limits (one per server, used on the event loop only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._usage: dict[str, _Usage] = {}
        self._clock = clock

    def admit(self, key: ApiKey) -> None:
        """Count a new request of `key`, or raise KeyLimitExceeded naming the limit it would pass."""
        lim, now = key.limits, self._clock()
        use = self._usage.setdefault(key.name, _Usage())
        while use.started and use.started[0] <= now - WINDOW:
            use.started.popleft()
        while use.tokens and use.tokens[0][0] <= now - WINDOW:
            use.tokens.popleft()
        if lim.concurrency is not None and use.in_flight >= lim.concurrency:
            raise KeyLimitExceeded(key, "concurrency", f"{use.in_flight} requests in flight, its limit "
                                   f"(concurrency={lim.concurrency}); retry when one has ended", 1)
        if lim.rpm is not None and len(use.started) >= lim.rpm:
            raise KeyLimitExceeded(key, "rpm", f"{len(use.started)} requests in the last minute, its limit "
                                   f"(rpm={lim.rpm})", use.started[0] + WINDOW - now)
        used = sum(n for _, n in use.tokens)
        if lim.tpm is not None and used >= lim.tpm:
            wait, left = 0.0, used
            for when, n in use.tokens:  # until enough of the minute's tokens age out
                left, wait = left - n, when + WINDOW - now
                if left < lim.tpm:
                    break
            raise KeyLimitExceeded(key, "tpm", f"{used} tokens in the last minute, over its limit "
                                   f"(tpm={lim.tpm})", wait)
        use.in_flight += 1
        use.started.append(now)

    def release(self, key: ApiKey, tokens: int) -> None:
        """The request has ended, having used `tokens` (prompt + generated)."""
        use = self._usage[key.name]
        use.in_flight -= 1
        if tokens:
            use.tokens.append((self._clock(), tokens))
