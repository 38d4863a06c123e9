"""Operations endpoints, open without an API key: GET /health and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from clients.protocol import Health
from server.serving import Serving

router = APIRouter()


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(http: HttpRequest) -> JSONResponse:
    """200 once the model is loaded and the engine loop runs; 503 while loading, draining, or dead."""
    serving: Serving = http.app.state.serving
    status = serving.status
    body = Health(status=status, model=serving.config.served_name)  # type: ignore[arg-type]
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format 0.0.4 (every tzd_* metric)",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(http: HttpRequest) -> Response:
    """The server's Prometheus metrics (open without an API key, like /health)."""
    serving: Serving = http.app.state.serving
    data, content_type = serving.metrics.render()
    return Response(data, media_type=content_type)
