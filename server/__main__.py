"""`python -m server`: load a checkpoint and serve it; SIGTERM drains (503 to new requests) and exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn
from sse_starlette.sse import AppStatus

from server.app import create_app
from server.config import ServerConfig, parse_config
from server.logs import configure_logging
from server.serving import Serving
from tzd.checkpoint import CheckpointError, check_checkpoint, resolve_device
from tzd.quant import QuantizationError, check_device

log = logging.getLogger("tzd.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains the engine before the server stops."""

    def __init__(self, config: uvicorn.Config, serving: Serving, shutdown_timeout: float) -> None:
        super().__init__(config)
        # streams end through the engine's drain (their last event sent), not by sse-starlette cutting them
        # at the first signal
        AppStatus.disable_automatic_graceful_drain()
        self.serving, self.shutdown_timeout = serving, shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # not recorded as a captured signal: uvicorn would re-raise it after shutdown and the exit code
        # would be the signal's, not 0
        if self._draining or self._loop is None:
            self.force_exit = self.should_exit  # a second signal while stopping: stop now
            self.should_exit = True
            return
        self._draining = True
        log.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        await self.serving.drain(self.shutdown_timeout)
        self.should_exit = True

    def fatal(self, exc: BaseException) -> None:
        self.exit_code = 1
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    cfg: ServerConfig = parse_config(argv)
    configure_logging(cfg.log_level, cfg.log_format)
    try:
        check_checkpoint(cfg.checkpoint)  # fail fast on a bad path, before binding the port
    except CheckpointError as e:
        print(f"error: --checkpoint: {e}", file=sys.stderr)
        return 2
    if cfg.quant_config is not None:
        try:
            check_device(cfg.quant_config, resolve_device(cfg.device))  # fp8 off a capable GPU
        except QuantizationError as e:
            print(f"error: --quantization: {e}", file=sys.stderr)
            return 2
    holder: list[DrainingServer] = []
    app = create_app(cfg, on_fatal=lambda e: holder[0].fatal(e))
    # log_config=None: uvicorn's loggers go through configure_logging's handler; server.middleware writes
    # the access lines (with the request id, tokens and timings uvicorn's own lines lack)
    ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                          log_config=None, timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(ucfg, app.state.serving, cfg.shutdown_timeout)
    holder.append(server)
    server.run()
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
