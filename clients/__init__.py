"""The TZD Python SDK: TZDClient / AsyncTZDClient for a TZD server, and `python -m clients` (no torch needed)."""

from clients.client import (
    DEFAULT_BASE_URL,
    DEFAULT_TIMEOUT,
    AsyncTZDClient,
    Completion,
    Event,
    EventStream,
    RetryPolicy,
    StepEvent,
    TextCompletion,
    TZDClient,
)
from clients.errors import (
    APIConnectionError,
    APIError,
    APITimeout,
    AuthenticationError,
    BadRequest,
    RateLimited,
    ServerUnavailable,
    StreamInterrupted,
    TZDError,
)
from clients.protocol import ChatCompletion, CommittedToken, Health, ModelCard, SamplingParams, Usage

__all__ = [
    "DEFAULT_BASE_URL", "DEFAULT_TIMEOUT", "APIConnectionError", "APIError", "APITimeout", "AsyncTZDClient",
    "AuthenticationError", "BadRequest", "ChatCompletion", "CommittedToken", "Completion", "Event", "EventStream",
    "Health", "ModelCard", "RateLimited", "RetryPolicy", "SamplingParams", "ServerUnavailable", "StepEvent",
    "StreamInterrupted", "TZDClient", "TZDError", "TextCompletion", "Usage",
]
