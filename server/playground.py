"""The web playground: GET / serves a static page that streams POST /generate and draws the canvas unmasking.

The page's files (server/static: index.html, app.js, style.css; no build step, nothing fetched from outside)
are served under /playground/, and GET /playground/status is the small JSON the page polls for its
metrics strip and to learn whether the server wants an API key. Both are open, like /health and /metrics:
the page itself holds no secret, and generating still needs the key where the server has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from server.serving import Serving

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/playground"
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate, so a new server version's page is picked up


class PlaygroundStatus(BaseModel):
    """GET /playground/status: what the page shows in its metrics strip and needs to set up its form."""

    status: str  # as /health: ok | loading | draining | dead | failed
    model: str
    auth: bool  # /generate needs `Authorization: Bearer <key>`
    context: int | None  # the model's context in tokens (prompt + max_tokens must fit); None until loaded
    chat: bool = False  # the model has a chat template: the page offers its chat mode (`messages`)
    infill: bool = False  # the model is bidirectional: the page offers its infill mode (`suffix`)
    max_tokens_limit: int
    max_batch_size: int
    running: int  # requests in the running batch (the batch size of the next step)
    waiting: int  # requests waiting for a slot
    steps: int  # batched denoising steps run since the server started
    mean_batch_size: float | None  # requests per step, averaged over those steps; None before the first


def status(serving: Serving) -> PlaygroundStatus:
    """The status from the server's own metrics (the same numbers /metrics renders)."""
    cfg, registry = serving.config, serving.metrics.registry

    def value(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    steps, requests = value("tzd_batch_size_count"), value("tzd_batch_size_sum")
    return PlaygroundStatus(
        status=serving.status, model=cfg.served_name, auth=bool(cfg.api_keys),
        context=serving.runtime.context if serving.runtime is not None else None,
        chat=serving.runtime is not None and serving.runtime.loaded.tokenizer.chat is not None,
        infill=serving.runtime is not None and serving.runtime.loaded.model_config.denoise_block is None,
        max_tokens_limit=cfg.max_tokens_limit, max_batch_size=cfg.max_batch_size,
        running=int(value("tzd_requests_running")), waiting=int(value("tzd_requests_waiting")),
        steps=int(steps), mean_batch_size=requests / steps if steps else None)


class RevalidatedFiles(StaticFiles):
    """The page's files, revalidated on every load, so a page never runs with another version's script."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


def router() -> APIRouter:
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=NO_CACHE)

    @r.get(f"{PREFIX}/status", response_model=PlaygroundStatus, tags=["playground"])
    async def playground_status(http: HttpRequest) -> PlaygroundStatus:
        """Server status for the playground page: model, limits, whether a key is needed, running requests."""
        return status(http.app.state.serving)

    return r


def install(app: FastAPI) -> None:
    """Add GET /, GET /playground/status and the page's files under /playground/ to `app`."""
    app.include_router(router())  # before the mount, so /playground/status is a route, not a file
    app.mount(PREFIX, RevalidatedFiles(directory=STATIC_DIR), name="playground")
