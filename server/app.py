"""The FastAPI application: routes, auth, error bodies, limits; the model loads in the background."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from server import openapi, playground, routes_chat, routes_generate, routes_openai, routes_ops
from server.auth import bearer_auth
from server.config import ServerConfig
from server.errors import install_error_handlers
from server.middleware import BodyLimit, RequestContext
from server.serving import Serving


def create_app(config: ServerConfig, on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app for `config`; `on_fatal` is called if the model cannot be loaded (the CLI then exits 1)."""
    serving = Serving(config, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(serving.load(), name="tzd-load")
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await serving.close()

    app = FastAPI(title="TZD", version="0.1.0", lifespan=lifespan,
                  description="Masked-diffusion language model server: /generate streams every denoising "
                              "step; /v1 speaks OpenAI's completions and chat completions APIs.")
    app.state.serving = serving
    auth = bearer_auth(config.api_keys, serving.limiter)
    app.include_router(routes_ops.router)
    app.include_router(routes_generate.router(auth))
    app.include_router(routes_openai.router(auth))
    app.include_router(routes_chat.router(auth))
    playground.install(app)  # GET /: the web playground
    install_error_handlers(app, lambda reason: serving.metrics.rejected.labels(reason).inc())
    openapi.install(app, config.max_tokens_limit)

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, metrics=serving.metrics)
    # outermost: ids, counts and logs 413s too; closes keep-alive connections once draining
    app.add_middleware(RequestContext, metrics=serving.metrics, closing=lambda: serving.status == "draining")
    return app
