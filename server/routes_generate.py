"""POST /generate: the native endpoint, one JSON answer or a stream of step events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi import Request as HttpRequest
from sse_starlette import ServerSentEvent

from clients.protocol import (
    DONE_EVENT,
    ERROR_EVENT,
    STEP_EVENT,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    StepEvent,
    Timings,
    Usage,
)
from server.engine import Engine
from server.errors import GENERATION_ERRORS, error_body, request_id
from server.openapi import named_events, sse_content
from server.output import Result
from server.request import Request, RequestFailed, RequestGroup
from server.serving import Serving
from server.streams import collect, set_outcome, sse, stream_response, track

STREAM_CONTENT = sse_content(
    named_events({STEP_EVENT: StepEvent, DONE_EVENT: GenerateResponse, ERROR_EVENT: ErrorBody}),
    "With stream=true: a `step` event per denoising step (a reader that falls behind gets them coalesced: the "
    "latest step, the committed tokens of all), then `done` with the answer, or `error`; comment lines keep "
    "the connection alive")


def response(serving: Serving, group: RequestGroup, req: Request, result: Result) -> GenerateResponse:
    """The final answer (also the `done` event's data)."""
    end = req.finished or req.arrival
    admitted = req.admitted or end
    n_prompt, n_gen = len(req.prompt_ids), len(result.tokens)
    return GenerateResponse(
        id=group.id, model=serving.config.served_name, text=result.text, tokens=result.tokens,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen),
        steps=result.steps, nfe=result.nfe, seed=req.plan.seed,
        timings=Timings(queue=admitted - req.arrival,
                        first_step=None if req.first_step is None else req.first_step - req.arrival,
                        total=end - req.arrival))


async def step_events(serving: Serving, engine: Engine, group: RequestGroup, http: HttpRequest
                      ) -> AsyncIterator[ServerSentEvent]:
    """`step` per denoising step, then `done`; `error` if it fails; a disconnect cancels the request."""
    ended = False
    track(http, group)
    try:
        async for req, up in group.updates():
            if up.event is not None:
                yield sse(up.event.model_dump_json(), STEP_EVENT)
            if up.result is not None:
                yield sse(response(serving, group, req, up.result).model_dump_json(), DONE_EVENT)
        ended = True
    except RequestFailed as e:
        ended = True
        set_outcome(http, "error")
        yield sse(error_body(500, str(e), code="generation_failed").model_dump_json(), ERROR_EVENT)
    finally:
        if not ended:  # the client went away (the stream was cancelled): free the slot
            set_outcome(http, "499")
            engine.cancel(group)


def router(auth: object) -> APIRouter:
    r = APIRouter()

    @r.post("/generate", response_model=GenerateResponse, dependencies=[Depends(auth)],
            responses={**GENERATION_ERRORS, 200: {"content": STREAM_CONTENT,
                                                  "description": "JSON, or with stream=true the step/done/error events"}})
    async def generate(body: GenerateRequest, http: HttpRequest):  # noqa: ANN202 - JSON or a stream
        serving: Serving = http.app.state.serving
        engine = serving.ready_engine()
        prompt = body.prompt if body.messages is None else serving.chat_prompt(body.messages)
        group = serving.new_group("gen", [prompt], [body.sampling_params()],
                                  "events" if body.stream else "none", request_id=request_id(http),
                                  timeout=body.timeout)
        engine.submit(group)
        if body.stream:
            return stream_response(http, step_events(serving, engine, group, http))
        [result] = await collect(engine, group, http)
        return response(serving, group, group.requests[0], result)

    return r
