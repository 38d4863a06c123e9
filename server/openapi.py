"""The OpenAPI document as the server really answers: error bodies, event streams, Prometheus text.

FastAPI writes most of it from the routes' `responses=` (see server.errors.error_responses and `sse_content`
below); this module fixes what FastAPI cannot know:
- the 422 answers FastAPI documents are never sent (validation errors are 400s with the error body);
- an operation behind the API key (FastAPI's HTTPBearer in server.auth) can answer 401;
- every answer carries X-Request-Id;
- the event schemas that only a stream refers to must be in components;
- this server's --max-tokens-limit bounds max_tokens, steps and block_length of every request body.
Event streams follow the convention OpenAPI 3.2 made official and that checkers read for 3.1: the
`text/event-stream` schema describes one event, whose `data` is a JSON document (contentMediaType and
contentSchema).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from clients.protocol import ChatCompletionChunk, ErrorBody, StepEvent
from server.errors import error_responses

REQUEST_ID_HEADER = {
    "X-Request-Id": {"description": "The request's id: the client's X-Request-Id if it sent a usable one "
                                    "(1-128 visible ASCII characters), else one the server made. It is in "
                                    "the access log line and in every error body.",
                     "required": True, "schema": {"type": "string"}}}
STREAM_MODELS: list[type[BaseModel]] = [StepEvent, ErrorBody, ChatCompletionChunk]  # referenced only from event schemas
TOKEN_COUNT_FIELDS = ("max_tokens", "steps", "block_length")  # each <= max_tokens <= --max-tokens-limit


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """An SSE `data` field that holds one JSON document of `schema`."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def sse_content(event_schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A `responses=` entry's `content` for a text/event-stream answer whose events are `event_schema`."""
    return {"text/event-stream": {"schema": {**event_schema, "description": description}}}


def named_events(events: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """Events `event: NAME` / `data: <JSON of the model>`, one schema per name."""
    return {"oneOf": [{"type": "object", "required": ["event", "data"],
                       "properties": {"event": {"const": name}, "data": json_data(ref(model))}}
                      for name, model in events.items()]}


def data_events(models: list[type[BaseModel]], terminator: str) -> dict[str, Any]:
    """Unnamed events (`data:` lines only) holding one of `models` as JSON, and a last `data: <terminator>`."""
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"const": "message"},
                           "data": {"anyOf": [{"const": terminator},
                                              json_data({"anyOf": [ref(m) for m in models]})]}}}


def _model_schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _bound_token_counts(schema: dict[str, Any], limit: int) -> None:
    """Give the integer form of each token-count property of a request schema its maximum."""
    for name in TOKEN_COUNT_FIELDS:
        prop = schema.get("properties", {}).get(name)
        if prop is None:
            continue
        for form in [prop, *prop.get("anyOf", [])]:
            if form.get("type") == "integer":
                form["maximum"] = limit


def build_openapi(app: FastAPI, max_tokens_limit: int) -> dict[str, Any]:
    """FastAPI's document for `app`, with what it cannot know added (see the module docstring)."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in _model_schemas(STREAM_MODELS).items():
        schemas.setdefault(name, schema)
    for schema in schemas.values():
        if "max_tokens" in schema.get("properties", {}) and "prompt" in schema["properties"]:
            _bound_token_counts(schema, max_tokens_limit)
    unauthorized = error_responses(401)[401]
    for path_item in doc.get("paths", {}).values():
        for op in path_item.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if op.get("security") and "401" not in responses:
                responses["401"] = {"description": unauthorized["description"],
                                    "content": {"application/json": {"schema": ref(ErrorBody)}}}
            for answer in responses.values():
                answer.setdefault("headers", {}).update(REQUEST_ID_HEADER)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return doc


def install(app: FastAPI, max_tokens_limit: int) -> None:
    """Serve build_openapi's document at /openapi.json (built once, on the first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, max_tokens_limit)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
