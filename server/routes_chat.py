"""POST /v1/chat/completions: OpenAI's chat API over the model's own chat template.

The messages are rendered exactly as transformers' apply_chat_template renders them
(tzd.hf.chat), the eos set of the model (end of turn, end of text) ends an answer, and a stream
carries the committed left-to-right text of each choice as it grows: a diffusion model commits
tokens anywhere in its block, but a chat client can only append.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from clients.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Usage,
)
from server.engine import Engine
from server.errors import ApiError, error_body
from server.request import RequestFailed, RequestGroup
from server.routes_openai import choice_params
from server.serving import Serving
from server.streams import SSE_HEADERS, collect, set_outcome, sse


def usage(group: RequestGroup, generated: int) -> Usage:
    """One conversation, counted once however many choices (n) it has."""
    n_prompt = len(group.requests[0].prompt_ids)
    return Usage(prompt_tokens=n_prompt, completion_tokens=generated, total_tokens=n_prompt + generated)


async def chat_chunks(engine: Engine, group: RequestGroup, http: HttpRequest, model: str, include_usage: bool
                      ) -> AsyncIterator[str]:
    """Per choice: the role, then content deltas, then its finish_reason; usage if asked; [DONE]."""
    ended, n_gen = False, 0

    def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=group.id, created=group.created, model=model, choices=choices,
                                       usage=use).model_dump_json())

    try:
        yield chunk([ChatChunkChoice(index=r.index, delta=ChatDelta(role="assistant", content=""))
                     for r in group.requests])
        async for req, up in group.updates():
            reason = up.result.finish_reason if up.result is not None else None
            if up.delta or reason is not None:
                yield chunk([ChatChunkChoice(index=req.index, delta=ChatDelta(content=up.delta or None),
                                             finish_reason=reason)])  # type: ignore[arg-type]
            if up.result is not None:
                n_gen += len(up.result.tokens)
        if include_usage:
            yield chunk([], usage(group, n_gen))
        yield sse("[DONE]")
        ended = True
    except RequestFailed as e:
        ended = True
        set_outcome(http, "error")
        yield sse(error_body(500, str(e), code="generation_failed").model_dump_json())
    finally:
        if not ended:
            set_outcome(http, "499")
            engine.cancel(group)


def router(auth: object) -> APIRouter:
    r = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @r.post("/chat/completions", response_model=ChatCompletion,
            responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or `data:` chunks"}})
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):  # noqa: ANN202 - JSON or a stream
        serving: Serving = http.app.state.serving
        engine = serving.ready_engine()
        name = serving.config.served_name
        if body.model is not None and body.model != name:
            raise ApiError(404, f"model: {body.model!r} is not served here; this server serves {name!r}",
                           param="model", code="model_not_found", reason="invalid")
        if body.n > engine.scheduler.max_waiting:  # could never be queued: not a retry-later 429
            raise ApiError(400, f"n: {body.n} choices exceed this server's queue of {engine.scheduler.max_waiting}",
                           param="n", reason="invalid")
        prompt = serving.chat_prompt(body.messages)
        group = serving.new_group("chatcmpl", [prompt] * body.n, choice_params(body.sampling_params(), body.n),
                                  "prefix" if body.stream else "none")
        engine.submit(group)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(chat_chunks(engine, group, http, name, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        results = await collect(engine, group, http)
        return ChatCompletion(
            id=group.id, created=group.created, model=name, usage=usage(group, sum(len(r.tokens) for r in results)),
            choices=[ChatChoice(index=i, message=AssistantMessage(content=r.text),
                                finish_reason=r.finish_reason)  # type: ignore[arg-type]
                     for i, r in enumerate(results)])

    return r
