"""TZDClient and AsyncTZDClient: the Python SDK of a TZD server (httpx; the wire schema of clients.protocol).

Both clients share `_Core` (configuration, the requests they send with bodies checked by the protocol's
pydantic models, error mapping, the retry policy run by tenacity) and `EventStream` (server-sent events,
parsed by httpx-sse, into typed objects); each only adds its own I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import httpx
import tenacity
from httpx_sse import EventSource, ServerSentEvent
from pydantic import BaseModel, ValidationError

from clients.errors import (
    APIConnectionError,
    APIError,
    APITimeout,
    BadRequest,
    StreamInterrupted,
    error_from_body,
)
from clients.protocol import (
    DONE_EVENT,
    ERROR_EVENT,
    STEP_EVENT,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelList,
    StepEvent,
    TextCompletion,
)

log = logging.getLogger("tzd.client")

Completion = GenerateResponse  # what generate() returns and stream() ends with: text, tokens, finish_reason, ...
Event = StepEvent | Completion
M = TypeVar("M", bound=BaseModel)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)  # a whole non-streamed generation must fit in `read`
VERSION = "0.1.0"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When a failed request is sent again, and after how long (both clients run it with tenacity).

    Retried: 429 and 503 answers (the server refused before doing any work, so this is safe for
    generation too), waiting for the server's Retry-After (or exponential backoff with jitter when it
    sent none); connections that could not be made. Not retried: a generation whose request reached the
    server and then failed or timed out (the work may have run; a random seed would silently change the
    answer), a stream that already delivered events, a Retry-After longer than `max_wait`, any other error.
    """

    max_retries: int = 2  # attempts after the first; 0 turns retrying off
    backoff: float = 0.5  # first wait (s) when the server gave no Retry-After; doubles per attempt
    max_backoff: float = 8.0
    max_wait: float = 60.0  # a longer Retry-After is not waited for: the error is raised at once
    statuses: frozenset[int] = frozenset({429, 503})

    def should_retry(self, attempt: int, error: BaseException, *, idempotent: bool) -> bool:
        """Whether attempt `attempt + 1` follows the failed attempt `attempt` (counting from 0)."""
        if attempt >= self.max_retries or not isinstance(error, APIError):
            return False
        if isinstance(error, APIConnectionError):
            return not (error.sent and not idempotent)
        if error.status in self.statuses:
            retry_after = getattr(error, "retry_after", None)
            return retry_after is None or retry_after <= self.max_wait
        return False

    def wait(self, attempt: int, error: BaseException) -> float:
        """Seconds before the next attempt: the server's Retry-After, else backoff with jitter."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None and not isinstance(error, APIConnectionError):
            return retry_after
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)

    def delay(self, attempt: int, error: APIError, *, sent: bool, idempotent: bool) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to raise `error` (attempt counts from 0)."""
        if isinstance(error, APIConnectionError):
            error.sent = sent
        if not self.should_retry(attempt, error, idempotent=idempotent):
            return None
        return self.wait(attempt, error)

    def tenacity_args(self, idempotent: bool) -> dict[str, Any]:
        """This policy as tenacity.Retrying / AsyncRetrying arguments (the last error is re-raised)."""
        def retry(state: tenacity.RetryCallState) -> bool:
            assert state.outcome is not None
            err = state.outcome.exception()
            return err is not None and self.should_retry(state.attempt_number - 1, err, idempotent=idempotent)

        def wait(state: tenacity.RetryCallState) -> float:
            assert state.outcome is not None
            return self.wait(state.attempt_number - 1, state.outcome.exception())  # type: ignore[arg-type]

        def log_retry(state: tenacity.RetryCallState) -> None:
            assert state.outcome is not None and state.next_action is not None
            log.info("%s: retrying in %.2f s (retry %d of %d)", state.outcome.exception(), state.next_action.sleep,
                     state.attempt_number, self.max_retries)

        return {"retry": retry, "wait": wait, "stop": tenacity.stop_never, "reraise": True, "before_sleep": log_retry}


def bad_request(exc: ValidationError) -> BadRequest:
    """A client-side validation failure as the BadRequest the server would answer (named by its field)."""
    errors = exc.errors()
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    param = loc[0] if loc else None
    msgs = [str(e.get("msg", "invalid value")).removeprefix("Value error, ") for e in errors
            if [str(p) for p in e.get("loc", ())][:1] == loc[:1]]
    message = f"{param}: {' or '.join(dict.fromkeys(msgs))}" if param else "; ".join(msgs)
    return BadRequest(message, param=param)


def connection_error(exc: httpx.TransportError, url: str) -> APIConnectionError:
    """The SDK's error for a request that got no (complete) answer; `.sent` says whether it may have reached
    the server (connect failures and pool waits did not)."""
    if isinstance(exc, httpx.TimeoutException):
        err: APIConnectionError = APITimeout(f"{url}: no answer within the timeout ({type(exc).__name__})")
    else:
        err = APIConnectionError(f"{url}: {type(exc).__name__}: {exc}")
    err.sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    err.__cause__ = exc
    return err


class _Core:
    """Everything both clients share that does no I/O: configuration, bodies, parsing, errors, retries."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout | None,
                 retry: RetryPolicy) -> None:
        url = (base_url or os.environ.get("TZD_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        if api_key is None:  # TZD_API_KEY may list several keys (comma-separated, as the server reads it)
            api_key = next((k.strip() for k in os.environ.get("TZD_API_KEY", "").split(",") if k.strip()), None)
        self.base_url, self.retry = url, retry
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.headers = {"User-Agent": f"tzd-client/{VERSION}", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def url(self, path: str) -> str:
        return self.base_url + path

    # ---- request bodies, checked with the server's own models before anything is sent ----

    @staticmethod
    def generate_body(prompt: str | list[int] | None, params: dict[str, Any], stream: bool) -> dict[str, Any]:
        """The JSON of POST /generate (a prompt, or `messages=` in params for a chat model); raises BadRequest
        naming the field for a bad parameter."""
        if "stream" in params:
            raise BadRequest("stream: use stream() for step events, generate() for one answer", param="stream")
        given = {} if prompt is None else {"prompt": prompt}
        try:
            req = GenerateRequest.model_validate({**given, **params, "stream": stream})
        except ValidationError as e:
            raise bad_request(e) from None
        return req.model_dump(mode="json", exclude_unset=True)

    @staticmethod
    def completion_body(prompt: str | list[str] | list[int] | list[list[int]], params: dict[str, Any]
                        ) -> dict[str, Any]:
        """The JSON of POST /v1/completions (not streamed); raises BadRequest naming the field."""
        if params.get("stream"):
            raise BadRequest("stream: complete() answers once; use stream() for step events", param="stream")
        try:
            req = CompletionRequest.model_validate({"prompt": prompt, **params})
        except ValidationError as e:
            raise bad_request(e) from None
        return req.model_dump(mode="json", exclude_unset=True, exclude={"stream", "stream_options"})

    @staticmethod
    def chat_body(messages: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        """The JSON of POST /v1/chat/completions (not streamed); raises BadRequest naming the field."""
        if params.get("stream"):
            raise BadRequest("stream: chat() answers once; use stream(messages=...) for step events", param="stream")
        try:
            req = ChatCompletionRequest.model_validate({"messages": messages, **params})
        except ValidationError as e:
            raise bad_request(e) from None
        return req.model_dump(mode="json", exclude_unset=True, exclude={"stream", "stream_options"})

    # ---- answers ----

    @staticmethod
    def error(resp: httpx.Response) -> APIError:
        """The typed exception for an error answer (its body must have been read)."""
        try:
            body = resp.json()
        except ValueError:
            body = None
        return error_from_body(resp.status_code, body, resp.headers,
                               fallback=resp.text[:300].strip() or resp.reason_phrase)

    @staticmethod
    def parse(model: type[M], resp: httpx.Response) -> M:
        """A successful answer as `model`; an answer that does not fit is an APIError, not a crash."""
        try:
            return model.model_validate_json(resp.content)
        except ValidationError as e:
            raise APIError(f"unexpected answer from {resp.request.url}: {e.errors()[0].get('msg')}",
                           status=resp.status_code) from e

    def health(self, resp: httpx.Response) -> Health:
        """/health's answer: a Health body with 200 or 503 (loading, draining); any other error raises."""
        if resp.status_code != 200:
            try:
                return Health.model_validate_json(resp.content)
            except ValidationError:
                raise self.error(resp) from None
        return self.parse(Health, resp)

    def request(self, http: httpx.Client | httpx.AsyncClient, method: str, path: str,
                body: dict[str, Any] | None) -> httpx.Request:
        """The request both clients send (and send again on a retry)."""
        return http.build_request(method, self.url(path), json=body, headers=self.headers, timeout=self.timeout)

    def retrying(self, method: str, retry: bool) -> dict[str, Any]:
        """tenacity arguments for one call: the client's RetryPolicy, or a single attempt."""
        policy = self.retry if retry else dataclasses.replace(self.retry, max_retries=0)
        return policy.tenacity_args(idempotent=method == "GET")


class EventStream:
    """Turns the server-sent events of a POST /generate stream (parsed by httpx-sse) into StepEvents and the
    final Completion; raises the server's error for an `error` event."""

    def __init__(self) -> None:
        self.steps = 0  # step events seen
        self.done = False

    def on_event(self, sse: ServerSentEvent) -> Event | None:
        """The typed event for one server-sent event; None for an event this client does not know."""
        if not sse.data:
            return None
        try:
            if sse.event == STEP_EVENT:
                self.steps += 1
                return StepEvent.model_validate_json(sse.data)
            if sse.event == DONE_EVENT:
                done = GenerateResponse.model_validate_json(sse.data)
                self.done = True
                return done
            if sse.event == ERROR_EVENT:
                body = json.loads(sse.data)
            else:
                return None  # an event this client does not know: skip it
        except (ValidationError, ValueError) as e:
            raise StreamInterrupted(f"malformed {sse.event!r} event after {self.steps} steps: {e}") from e
        raise error_from_body(None, body, fallback="the server failed the request mid-stream")

    def interrupted(self, exc: BaseException | None = None) -> StreamInterrupted:
        """The error for a stream that ended (or broke, with `exc`) before its `done` event."""
        why = f"the connection broke ({type(exc).__name__}: {exc})" if exc is not None else \
            "the server closed the stream"
        err = StreamInterrupted(f"{why} after {self.steps} step events, before the final `done` event")
        err.__cause__ = exc
        return err


def _check_stream(resp: httpx.Response) -> None:
    ctype = resp.headers.get("content-type", "")
    if not ctype.startswith("text/event-stream"):
        raise APIError(f"expected an event stream from {resp.request.url}, got {ctype or 'no content type'}",
                       status=resp.status_code)


class _ClientBase:
    """Configuration common to both clients."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout | None,
                 max_retries: int | None, retry: RetryPolicy | None) -> None:
        retry = retry or RetryPolicy()
        if max_retries is not None:
            retry = dataclasses.replace(retry, max_retries=max_retries)
        self._core = _Core(base_url, api_key, timeout, retry)

    @property
    def base_url(self) -> str:
        return self._core.base_url

    @property
    def retry(self) -> RetryPolicy:
        return self._core.retry

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"


class TZDClient(_ClientBase):
    """Synchronous client: `with TZDClient(url, api_key=...) as c: c.generate("To be", max_tokens=32)`.

    base_url defaults to $TZD_BASE_URL, then http://127.0.0.1:8000; api_key to $TZD_API_KEY. `timeout` is
    seconds (or an httpx.Timeout; the read timeout bounds a whole non-streamed generation and the gap
    between two stream events). Retries follow `retry` (see RetryPolicy), or `max_retries` with the
    default policy. `http_client` lets you bring your own httpx.Client (proxies, hooks); it is not closed.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int | None = None,
                 retry: RetryPolicy | None = None, http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client()

    def __enter__(self) -> TZDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (not that of an http_client passed in)."""
        if self._owns_http:
            self._http.close()

    # ---- endpoints ----

    def generate(self, prompt: str | list[int] | None = None, **params: Any) -> Completion:
        """POST /generate: the whole answer at once; `params` are SamplingParams fields, or `messages=[...]`
        instead of a prompt for a model with a chat template."""
        body = self._core.generate_body(prompt, params, stream=False)
        return self._core.parse(Completion, self._send("POST", "/generate", body))

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion:
        """POST /v1/chat/completions (OpenAI's shape): `params` are ChatCompletionRequest fields (n, ...)."""
        body = self._core.chat_body(messages, params)
        return self._core.parse(ChatCompletion, self._send("POST", "/v1/chat/completions", body))

    def stream(self, prompt: str | list[int] | None = None, **params: Any) -> Iterator[Event]:
        """POST /generate, streamed: a StepEvent per denoising step, then the Completion (params checked now)."""
        body = self._core.generate_body(prompt, params, stream=True)
        return self._events(body)

    def complete(self, prompt: str | list[str] | list[int] | list[list[int]], **params: Any) -> TextCompletion:
        """POST /v1/completions (OpenAI's shape): `params` are CompletionRequest fields (model, n, ...)."""
        body = self._core.completion_body(prompt, params)
        return self._core.parse(TextCompletion, self._send("POST", "/v1/completions", body))

    def models(self) -> list[ModelCard]:
        """GET /v1/models: the model this server serves."""
        return self._core.parse(ModelList, self._send("GET", "/v1/models")).data

    def health(self) -> Health:
        """GET /health, tried once: status "ok", or "loading"/"draining"/... while the server answers 503."""
        return self._core.health(self._send("GET", "/health", ok=(200, 503), retry=False))

    # ---- I/O ----

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None, *, stream: bool = False,
              ok: tuple[int, ...] = (200,), retry: bool = True) -> httpx.Response:
        request = self._core.request(self._http, method, path, body)
        for attempt in tenacity.Retrying(**self._core.retrying(method, retry)):
            with attempt:
                return self._attempt(request, stream, ok)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _attempt(self, request: httpx.Request, stream: bool, ok: tuple[int, ...]) -> httpx.Response:
        """One try: the answer if its status is in `ok`, else the typed error."""
        try:
            resp = self._http.send(request, stream=stream)
            if resp.status_code in ok:
                return resp
            try:
                resp.read()
            finally:
                resp.close()
        except httpx.TransportError as e:
            raise connection_error(e, str(request.url)) from e
        raise self._core.error(resp)

    def _events(self, body: dict[str, Any]) -> Iterator[Event]:
        resp = self._send("POST", "/generate", body, stream=True)
        with contextlib.closing(resp):
            _check_stream(resp)
            decoder = EventStream()
            try:
                for sse in EventSource(resp).iter_sse():
                    item = decoder.on_event(sse)
                    if item is not None:
                        yield item
                    if decoder.done:
                        return
            except httpx.TransportError as e:
                raise decoder.interrupted(e) from e
            raise decoder.interrupted()


class AsyncTZDClient(_ClientBase):
    """Asynchronous client: `async with AsyncTZDClient(url) as c: await c.generate("To be")`; as TZDClient."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int | None = None,
                 retry: RetryPolicy | None = None, http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient()

    async def __aenter__(self) -> AsyncTZDClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool (not that of an http_client passed in)."""
        if self._owns_http:
            await self._http.aclose()

    # ---- endpoints ----

    async def generate(self, prompt: str | list[int] | None = None, **params: Any) -> Completion:
        """POST /generate: the whole answer at once; `params` are SamplingParams fields, or `messages=[...]`
        instead of a prompt for a model with a chat template."""
        body = self._core.generate_body(prompt, params, stream=False)
        return self._core.parse(Completion, await self._send("POST", "/generate", body))

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion:
        """POST /v1/chat/completions (OpenAI's shape): `params` are ChatCompletionRequest fields (n, ...)."""
        body = self._core.chat_body(messages, params)
        return self._core.parse(ChatCompletion, await self._send("POST", "/v1/chat/completions", body))

    def stream(self, prompt: str | list[int] | None = None, **params: Any) -> AsyncIterator[Event]:
        """POST /generate, streamed: `async for` StepEvents, then the Completion (params checked now)."""
        body = self._core.generate_body(prompt, params, stream=True)
        return self._events(body)

    async def complete(self, prompt: str | list[str] | list[int] | list[list[int]], **params: Any
                       ) -> TextCompletion:
        """POST /v1/completions (OpenAI's shape): `params` are CompletionRequest fields (model, n, ...)."""
        body = self._core.completion_body(prompt, params)
        return self._core.parse(TextCompletion, await self._send("POST", "/v1/completions", body))

    async def models(self) -> list[ModelCard]:
        """GET /v1/models: the model this server serves."""
        return self._core.parse(ModelList, await self._send("GET", "/v1/models")).data

    async def health(self) -> Health:
        """GET /health, tried once: status "ok", or "loading"/"draining"/... while the server answers 503."""
        return self._core.health(await self._send("GET", "/health", ok=(200, 503), retry=False))

    # ---- I/O ----

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None, *, stream: bool = False,
                    ok: tuple[int, ...] = (200,), retry: bool = True) -> httpx.Response:
        request = self._core.request(self._http, method, path, body)
        async for attempt in tenacity.AsyncRetrying(**self._core.retrying(method, retry)):
            with attempt:
                return await self._attempt(request, stream, ok)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _attempt(self, request: httpx.Request, stream: bool, ok: tuple[int, ...]) -> httpx.Response:
        """One try: the answer if its status is in `ok`, else the typed error."""
        try:
            resp = await self._http.send(request, stream=stream)
            if resp.status_code in ok:
                return resp
            try:
                await resp.aread()
            finally:
                await resp.aclose()
        except httpx.TransportError as e:
            raise connection_error(e, str(request.url)) from e
        raise self._core.error(resp)

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[Event]:
        resp = await self._send("POST", "/generate", body, stream=True)
        try:
            _check_stream(resp)
            decoder = EventStream()
            try:
                async for sse in EventSource(resp).aiter_sse():
                    item = decoder.on_event(sse)
                    if item is not None:
                        yield item
                    if decoder.done:
                        return
            except httpx.TransportError as e:
                raise decoder.interrupted(e) from e
            raise decoder.interrupted()
        finally:
            await resp.aclose()
