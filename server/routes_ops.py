"""Operations endpoints, open without an API key: GET /health (readiness), GET /live, GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from clients.protocol import Health
from server.serving import Serving

router = APIRouter()

# /live fails only where a restart is the cure: loading and draining are healthy states of the process
NOT_LIVE = ("dead", "failed")


def _health(serving: Serving) -> Health:
    engine = serving.engine
    running, waiting = (len(engine.scheduler.running), len(engine.scheduler.waiting)) if engine else (0, 0)
    attention = serving.runtime.loaded.model_config.attention if serving.runtime else None
    pages, usage = (engine.batch.kv.num_pages, engine.kv_usage) if engine else (None, None)
    quantization = (serving.runtime.quantization or "none") if serving.runtime else None
    return Health(status=serving.status, model=serving.config.served_name,  # type: ignore[arg-type]
                  running=running, waiting=waiting, max_batch_size=serving.config.max_batch_size,
                  max_num_batched_tokens=serving.config.max_num_batched_tokens, attention=attention,
                  kv_cache_pages=pages, kv_cache_usage=usage, quantization=quantization,
                  **(serving.runtime.model_size() if serving.runtime else {}))


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(http: HttpRequest) -> JSONResponse:
    """Readiness: 200 once the model is loaded and the engine loop runs; 503 while loading, draining, or dead.

    A load balancer takes a replica out of rotation on the 503 (a draining one first of all); the body's
    running/waiting counts are what a least-load router or an autoscaler reads.
    """
    body = _health(http.app.state.serving)
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)


@router.get("/live", response_model=Health, responses={503: {"model": Health}})
async def live(http: HttpRequest) -> JSONResponse:
    """Liveness: 200 while the process serves (loading and draining included); 503 once the engine died."""
    body = _health(http.app.state.serving)
    return JSONResponse(body.model_dump(), status_code=503 if body.status in NOT_LIVE else 200)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format 0.0.4 (every tzd_* metric)",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(http: HttpRequest) -> Response:
    """The server's Prometheus metrics (open without an API key, like /health).

    A plain def: FastAPI renders it on its thread pool, so a scrape (every replica's, every few seconds)
    never holds the event loop that writes the streams' step events."""
    serving: Serving = http.app.state.serving
    data, content_type = serving.metrics.render()
    return Response(data, media_type=content_type)
