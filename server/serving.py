"""What the routes share: the config, the metrics, and (once loaded) the runtime and the engine."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

import torch

from clients.protocol import ChatMessage, InfillGap, InfillText, SamplingParams
from server.config import ServerConfig
from server.engine import Engine, Unavailable
from server.keys import KeyLimiter
from server.metrics import Metrics
from server.output import RequestOutput, StreamMode
from server.prepare import ChatPrompt, infill_layout, prepare, render_chat
from server.request import RequestGroup
from server.runtime import Runtime, engine_config, load_runtime
from tzd.sampling.batch import compute_dtype

log = logging.getLogger("tzd.server")


class Serving:
    """The model behind the routes: loads in the background so /health can say 503 while it does."""

    def __init__(self, config: ServerConfig, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.config, self.on_fatal = config, on_fatal
        self.metrics = Metrics()
        self.limiter = KeyLimiter()  # the per-key limits of --api-key-file
        self.runtime: Runtime | None = None
        self.engine: Engine | None = None
        self.failure: str | None = None
        self.created = time.time()

    async def load(self) -> None:
        """Load the checkpoint (off the event loop), warm up, start the engine; then report healthy."""
        cfg = self.config
        try:
            log.info("loading %s (device %s, dtype %s)", cfg.checkpoint, cfg.device, cfg.dtype)
            rt = await asyncio.to_thread(load_runtime, cfg.checkpoint, cfg.device, cfg.dtype, cfg.threads,
                                         cfg.max_model_len, cfg.deterministic == "on", cfg.quant_config)
            engine = Engine(rt, self.metrics, engine_config(cfg, rt))
            await engine.start()
        except Exception as e:  # noqa: BLE001 - reported through /health and on_fatal
            self.failure = f"{type(e).__name__}: {e}"
            log.error("could not load the model: %s", self.failure)
            if self.on_fatal is not None:
                self.on_fatal(e)
            return
        self.metrics.model_info.info({
            "name": cfg.served_name, "path": str(rt.loaded.path), "params": str(rt.params),
            "device": str(rt.device), "dtype": rt.dtype_name, "context": str(rt.context),
            "backend": str(rt.loaded.model_config.backend), "max_batch_size": str(cfg.max_batch_size),
            "attention": rt.loaded.model_config.attention,
            "threads": str(torch.get_num_threads()), "deterministic": cfg.deterministic,
            "cuda_graphs": cfg.cuda_graphs, "kv_cache_pages": str(engine.batch.kv.num_pages),
            "quantization": rt.quantization or "none"})
        self.metrics.weight_bytes.set(rt.weight_bytes)
        # The imports and the load leave hundreds of thousands of long-lived objects that every later full
        # collection would walk again, pausing all threads, the steps and the streams, for tens of ms each
        # time. Frozen, they are skipped, as vLLM does.
        gc.collect()
        gc.freeze()
        self.runtime, self.engine = rt, engine
        log.info("loaded %s", rt.describe())
        kv = engine.batch.kv
        log.info("ready: serving %r, max batch %d, token budget %s, queue %d, KV cache %d pages of %d positions "
                 "(%.2f GiB)", cfg.served_name, cfg.max_batch_size, cfg.max_num_batched_tokens or "none",
                 cfg.max_queue, kv.num_pages, kv.page_size,
                 kv.capacity_bytes(compute_dtype(rt.loaded.model)) / (1 << 30))

    @property
    def status(self) -> str:
        if self.engine is None:
            return "failed" if self.failure else "loading"
        if self.engine.state == "draining":
            return "draining"
        return "ok" if self.engine.alive else "dead"

    def ready_engine(self) -> Engine:
        """The engine, or Unavailable (503) while loading, draining, or dead."""
        status = self.status
        if status != "ok" or self.engine is None:
            raise Unavailable("loading" if status == "loading" else status)
        return self.engine

    def chat_prompt(self, messages: list[ChatMessage]) -> ChatPrompt:
        """`messages` through the model's chat template (InvalidRequest naming `messages` without one)."""
        assert self.runtime is not None
        return render_chat(self.runtime.loaded.tokenizer, [m.template_dict() for m in messages])

    def new_group(self, prefix: str, prompts: list[str | list[int]], params: list[SamplingParams],
                  mode: StreamMode, n: int = 1, request_id: str | None = None,
                  timeout: float | None = None, suffix: str | list[int] | None = None,
                  infill: list[InfillText | InfillGap] | None = None, logprobs: bool = False) -> RequestGroup:
        """Checked requests, one per (prompt, params) pair (each prompt `n` times in a row); InvalidRequest
        names the bad field. The deadline is `timeout` or --request-timeout from now, whichever is sooner.
        `suffix` (after every prompt) or `infill` (instead of the prompts): an infill's layout; `logprobs`:
        the results carry each token's scores."""
        assert self.runtime is not None
        rt, group = self.runtime, RequestGroup(prefix, n, request_id)
        tok = rt.loaded.tokenizer
        mc = rt.loaded.model_config
        for prompt, p in zip(prompts, params, strict=True):
            prompt, layout = infill_layout(tok, prompt, suffix, infill, p.max_tokens, mc.vocab_size)
            ids, plan = prepare(tok, prompt, p, rt.context, mc.vocab_size, self.config.max_tokens_limit,
                                int(mc.logit_shift), mc.denoise_block, mc.block_align == "absolute", layout,
                                "infill" if infill is not None else "suffix", mc.decode_rule)
            if self.engine is not None:
                self.engine.check_fits(plan)
            output = RequestOutput(tok, mode, list(p.stop), plan.visible, layout, logprobs, p.top_logprobs)
            req = group.add(ids, plan, output)
            req.priority = p.priority
            limits = [t for t in (timeout, self.config.request_timeout) if t is not None]
            req.deadline = req.arrival + min(limits) if limits else None
        return group

    async def drain(self, timeout: float) -> None:
        if self.engine is not None:
            log.info("draining: finishing %d requests (up to %.0f s)", len(self.engine.scheduler.running)
                     + len(self.engine.scheduler.waiting), timeout)
            clean = await self.engine.drain(timeout)
            log.info("drained" if clean else "shutdown timeout: failed the requests left")

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        gc.unfreeze()  # the interpreter's last collections free them at exit (bindings warn of leaks otherwise)
