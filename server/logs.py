"""Logging of `python -m server`: human lines, or with --log-format json one JSON object per line.

Every logger goes through the root handler (uvicorn's too: it is started with log_config=None), so that the
access lines of server.middleware (logger tzd.access, their fields passed as `extra`) and everything else
share one format. In JSON, those fields are top-level keys (request_id, method, route, status, ...).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, fmt: LogFormat) -> None:
    """One stderr handler on the root logger, at `level`, in `fmt`."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                                           json_ensure_ascii=False))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
