"""POST /generate: the native endpoint, one JSON answer or a stream of step events."""

from __future__ import annotations

import time
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
    InfillGap,
    InfillText,
    StepEvent,
    Timings,
    Usage,
)
from server.engine import Engine
from server.errors import GENERATION_ERRORS, InvalidRequest, error_body, request_id
from server.logprobs import native
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


def filled_text(parts: list[InfillText | InfillGap], gaps: list[str]) -> str:
    """An infill's document: its text parts verbatim, each gap's fill in its place."""
    fills = iter(gaps)
    out, last_gap = [], False
    for p in parts:
        if isinstance(p, InfillText):
            out.append(p.text)
            last_gap = False
        elif not last_gap:  # adjacent gaps are one gap
            out.append(next(fills))
            last_gap = True
    return "".join(out)


def response(serving: Serving, group: RequestGroup, req: Request, result: Result,
             infill: list[InfillText | InfillGap] | None = None) -> GenerateResponse:
    """The final answer (also the `done` event's data). An infill's text is the whole filled document."""
    end = req.finished or req.arrival
    admitted = req.admitted or end
    n_prompt, n_gen = len(req.prompt_ids), len(result.tokens)
    text = filled_text(infill, result.gaps or []) if infill is not None else result.text
    logprobs = None
    if result.scores is not None:
        logprobs = native(serving.runtime.loaded.tokenizer, result.tokens, result.scores)  # type: ignore[union-attr]
    return GenerateResponse(
        id=group.id, model=serving.config.served_name, text=text, tokens=result.tokens, gaps=result.gaps,
        logprobs=logprobs,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen),
        steps=result.steps, nfe=result.nfe, seed=req.plan.seed,
        timings=Timings(queue=admitted - req.arrival,
                        first_step=None if req.first_step is None else req.first_step - req.arrival,
                        total=end - req.arrival))


async def step_events(serving: Serving, engine: Engine, group: RequestGroup, http: HttpRequest,
                      infill: list[InfillText | InfillGap] | None = None) -> AsyncIterator[ServerSentEvent]:
    """`step` per denoising step, then `done`; `error` if it fails; a disconnect cancels the request."""
    ended = False
    track(http, group)
    try:
        async for req, up in group.updates():
            if up.event is not None:
                up.event.elapsed = round(time.perf_counter() - req.arrival, 6)  # as written, not as stepped
                yield sse(up.event.model_dump_json(), STEP_EVENT)
            if up.result is not None:
                yield sse(response(serving, group, req, up.result, infill).model_dump_json(), DONE_EVENT)
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
            responses={**GENERATION_ERRORS,
                       200: {"content": STREAM_CONTENT,
                             "description": "JSON, or with stream=true the step/done/error events"}})
    async def generate(body: GenerateRequest, http: HttpRequest):  # noqa: ANN202 - JSON or a stream
        serving: Serving = http.app.state.serving
        engine = serving.ready_engine()
        if body.infill is not None and "max_tokens" in body.model_fields_set:
            raise InvalidRequest("max_tokens", "max_tokens: an infill's gaps give the lengths; leave it out")
        prompt = body.prompt if body.messages is None else serving.chat_prompt(body.messages)
        group = serving.new_group("gen", [prompt], [body.sampling_params()],  # type: ignore[list-item]
                                  "events" if body.stream else "none", request_id=request_id(http),
                                  timeout=body.timeout, suffix=body.suffix, infill=body.infill,
                                  logprobs=body.logprobs or body.top_logprobs > 0)
        engine.submit(group)
        if body.stream:
            return stream_response(http, step_events(serving, engine, group, http, body.infill))
        [result] = await collect(engine, group, http)
        return response(serving, group, group.requests[0], result, body.infill)

    return r
