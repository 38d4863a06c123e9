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
from sse_starlette import ServerSentEvent

from clients.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    ErrorBody,
    Usage,
)
from server.errors import GENERATION_ERRORS, ApiError, InvalidRequest, error_responses, request_id
from server.logprobs import chat
from server.openapi import data_events, sse_content
from server.output import Result
from server.request import RequestGroup
from server.routes_openai import choice_params, openai_stream, prompt_tokens
from server.serving import Serving
from server.streams import collect, sse, stream_response
from tzd.tokenizer import TextTokenizer

STREAM_CONTENT = sse_content(data_events([ChatCompletionChunk, ErrorBody], "[DONE]"),
                             "With stream=true: `data:` chunks (the role, then content deltas of each choice's "
                             "committed prefix, its finish_reason; usage on the last with "
                             "stream_options.include_usage), then `data: [DONE]`, or an error body instead")


def usage(group: RequestGroup, n: int, generated: int) -> Usage:
    n_prompt = prompt_tokens(group, n)  # one conversation, counted once however many choices
    return Usage(prompt_tokens=n_prompt, completion_tokens=generated, total_tokens=n_prompt + generated)


def choice_logprobs(tok: TextTokenizer, result: Result) -> ChoiceLogprobs | None:
    return chat(tok, result.tokens, result.scores) if result.scores is not None else None


async def chat_chunks(group: RequestGroup, model: str, include_usage: bool, n: int, tok: TextTokenizer
                      ) -> AsyncIterator[ServerSentEvent]:
    """Per choice: the role, then content deltas, then its finish_reason (and its logprobs, when asked, whole);
    usage last if asked."""
    n_gen = 0

    def chunk(choices: list[ChatChunkChoice], use: Usage | None = None) -> ServerSentEvent:
        return sse(ChatCompletionChunk(id=group.id, created=group.created, model=model, choices=choices,
                                       usage=use).model_dump_json())

    yield chunk([ChatChunkChoice(index=r.index, delta=ChatDelta(role="assistant", content=""))
                 for r in group.requests])
    async for req, up in group.updates():
        reason = up.result.finish_reason if up.result is not None else None
        if up.delta or reason is not None:
            lp = choice_logprobs(tok, up.result) if up.result is not None else None
            yield chunk([ChatChunkChoice(index=req.index, delta=ChatDelta(content=up.delta or None),
                                         finish_reason=reason, logprobs=lp)])  # type: ignore[arg-type]
        if up.result is not None:
            n_gen += len(up.result.tokens)
    if include_usage:
        yield chunk([], usage(group, n, n_gen))


def router(auth: object) -> APIRouter:
    r = APIRouter(prefix="/v1", dependencies=[Depends(auth)], responses=error_responses(503))

    @r.post("/chat/completions", response_model=ChatCompletion,
            responses={**GENERATION_ERRORS, **error_responses(404),
                       200: {"content": STREAM_CONTENT, "description": "JSON, or with stream=true `data:` chunks"}})
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
        if body.top_logprobs and not body.logprobs:  # OpenAI's rule
            raise InvalidRequest("top_logprobs", "top_logprobs: needs logprobs=true")
        prompt = serving.chat_prompt(body.messages)
        group = serving.new_group("chatcmpl", [prompt] * body.n, choice_params(body.sampling_params(), body.n),
                                  "prefix" if body.stream else "none", n=body.n, request_id=request_id(http),
                                  timeout=body.timeout, logprobs=bool(body.logprobs))
        engine.submit(group)
        tok = serving.runtime.loaded.tokenizer  # type: ignore[union-attr]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return stream_response(http, openai_stream(engine, group, http,
                                                       chat_chunks(group, name, include_usage, body.n, tok)))
        results = await collect(engine, group, http)
        return ChatCompletion(
            id=group.id, created=group.created, model=name,
            usage=usage(group, body.n, sum(len(r.tokens) for r in results)),
            choices=[ChatChoice(index=i, message=AssistantMessage(content=r.text), logprobs=choice_logprobs(tok, r),
                                finish_reason=r.finish_reason)  # type: ignore[arg-type]
                     for i, r in enumerate(results)])

    return r
