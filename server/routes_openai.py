"""OpenAI-compatible /v1: completions (JSON or `data:` chunks ending with [DONE]) and the model list."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from sse_starlette import ServerSentEvent

from clients.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorBody,
    ModelCard,
    ModelList,
    SamplingParams,
    TextCompletion,
    Usage,
)
from server.engine import Engine
from server.errors import GENERATION_ERRORS, ApiError, error_body, error_responses, request_id
from server.logprobs import completion
from server.openapi import data_events, sse_content
from server.output import Result
from server.request import RequestFailed, RequestGroup
from server.serving import Serving
from server.streams import collect, set_outcome, sse, stream_response, track
from tzd.tokenizer import TextTokenizer

SEED_SPACE = 2**63
STREAM_CONTENT = sse_content(data_events([TextCompletion, ErrorBody], "[DONE]"),
                             "With stream=true: `data:` chunks (text deltas of each choice's committed prefix; "
                             "usage on the last with stream_options.include_usage), then `data: [DONE]`, or an "
                             "error body instead")


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices of one prompt: with a seed, choice j uses seed + j so that they differ yet reproduce."""
    if params.seed is None or n == 1:
        return [params] * n
    return [params.model_copy(update={"seed": (params.seed + j) % SEED_SPACE}) for j in range(n)]


def prompt_tokens(group: RequestGroup, n: int) -> int:
    """Usage's prompt_tokens: each prompt counted once, however many (n) choices it has (OpenAI's rule)."""
    return sum(len(r.prompt_ids) for r in group.requests[::n])


async def openai_stream(engine: Engine, group: RequestGroup, http: HttpRequest,
                        chunks: AsyncIterator[ServerSentEvent]) -> AsyncIterator[ServerSentEvent]:
    """`chunks`, then `data: [DONE]`; a failed generation ends the stream with an error body instead, and a
    client that goes away cancels the group (completions and chat completions alike)."""
    ended = False
    track(http, group)
    try:
        async for chunk in chunks:
            yield chunk
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


def choice_logprobs(tok: TextTokenizer, result: Result, top: bool) -> CompletionLogprobs | None:
    return completion(tok, result.tokens, result.scores, top) if result.scores is not None else None


async def chunks(group: RequestGroup, model: str, usage: bool, n: int, tok: TextTokenizer, top: bool
                 ) -> AsyncIterator[ServerSentEvent]:
    """The committed left-to-right prefix of each choice as it grows (its logprobs, when asked, whole on its
    last chunk); usage last if asked."""
    n_gen, n_prompt = 0, prompt_tokens(group, n)

    def chunk(choices: list[CompletionChoice], use: Usage | None = None) -> ServerSentEvent:
        return sse(TextCompletion(id=group.id, created=group.created, model=model, choices=choices,
                                  usage=use).model_dump_json())

    async for req, up in group.updates():
        if up.delta or up.result is not None:
            reason = up.result.finish_reason if up.result is not None else None
            lp = choice_logprobs(tok, up.result, top) if up.result is not None else None
            yield chunk([CompletionChoice(index=req.index, text=up.delta, finish_reason=reason,  # type: ignore[arg-type]
                                          logprobs=lp)])
        if up.result is not None:
            n_gen += len(up.result.tokens)
    if usage:
        yield chunk([], Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen))


def router(auth: object) -> APIRouter:
    r = APIRouter(prefix="/v1", dependencies=[Depends(auth)], responses=error_responses(503))

    @r.get("/models", response_model=ModelList)
    async def models(http: HttpRequest) -> ModelList:
        serving: Serving = http.app.state.serving
        serving.ready_engine()
        assert serving.runtime is not None
        cfg = serving.runtime.loaded.model_config
        return ModelList(data=[ModelCard(id=serving.config.served_name, created=int(serving.created),
                                         max_model_len=serving.runtime.context, attention=cfg.attention,
                                         diffusion_block=cfg.denoise_block,
                                         quantization=serving.runtime.quantization or "none",
                                         **serving.runtime.model_size())])

    @r.post("/completions", response_model=TextCompletion,
            responses={**GENERATION_ERRORS, **error_responses(404),
                       200: {"content": STREAM_CONTENT, "description": "JSON, or with stream=true `data:` chunks"}})
    async def completions(body: CompletionRequest, http: HttpRequest):  # noqa: ANN202 - JSON or a stream
        serving: Serving = http.app.state.serving
        engine = serving.ready_engine()
        name = serving.config.served_name
        if body.model is not None and body.model != name:
            raise ApiError(404, f"model: {body.model!r} is not served here; this server serves {name!r}",
                           param="model", code="model_not_found", reason="invalid")
        prompts = [p for p in body.prompts() for _ in range(body.n)]
        if len(prompts) > engine.scheduler.max_waiting:  # could never be queued: not a retry-later 429
            raise ApiError(400, f"n: {len(prompts)} completions (prompts x n) exceed this server's queue of "
                                f"{engine.scheduler.max_waiting}; ask for fewer", param="n", reason="invalid")
        params = [p for _ in body.prompts() for p in choice_params(body.sampling_params(), body.n)]
        group = serving.new_group("cmpl", prompts, params, "prefix" if body.stream else "none", n=body.n,
                                  request_id=request_id(http), timeout=body.timeout, suffix=body.suffix,
                                  logprobs=body.logprobs is not None)
        engine.submit(group)
        tok, top = serving.runtime.loaded.tokenizer, bool(body.logprobs)  # type: ignore[union-attr]
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return stream_response(http, openai_stream(engine, group, http,
                                                       chunks(group, name, include_usage, body.n, tok, top)))
        results = await collect(engine, group, http)
        n_prompt = prompt_tokens(group, body.n)
        n_gen = sum(len(r.tokens) for r in results)
        return TextCompletion(
            id=group.id, created=group.created, model=name,
            choices=[CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason,  # type: ignore[arg-type]
                                      logprobs=choice_logprobs(tok, r, top))
                     for i, r in enumerate(results)],
            usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen))

    return r
