"""The engine: one model, one engine core, one thread of steps (continuous batching at the step level).

The step thread runs the engine core (tzd.sampling.core) step after step while there is work: expired,
cancelled and stopped requests leave, waiting ones join the free slots, one batched denoising step runs.
The event loop is not on that path: it queues requests (the core's line is locked) and dispatches what
the output thread rendered. Each step's events go to the output thread, which renders them (detokenising,
step events, stop strings, results) while the next step already runs; the rendered updates are routed
to the HTTP handlers on the event loop. One output thread takes the steps in order, so a request's
updates arrive in step order and its result last. Finished requests left the batch inside the step, so
their slots are free at the next one; one that a stop string ended while rendering leaves at the step
after (the step that ran meanwhile is not rendered). Only the step thread touches the batch; only the
output thread, a request's RequestOutput; the step thread runs at most RENDERS_IN_FLIGHT steps ahead of
the dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from clients.protocol import SamplingParams
from server.errors import InvalidRequest, QueueFull, Unavailable
from server.metrics import Metrics
from server.output import Update
from server.request import CANCELLED, Failure, Request, RequestGroup
from server.runtime import Runtime, inference
from tzd.sampling import DenoiseBatch, RequestPlan, SlotStep, plan
from tzd.sampling import scheduler as core_scheduler
from tzd.sampling.batch import compute_dtype
from tzd.sampling.config import EngineConfig
from tzd.sampling.core import CoreStep, EngineCore

log = logging.getLogger("tzd.server")

__all__ = ["Engine", "StepOutcome", "Unavailable"]

State = Literal["ready", "draining", "dead"]
RENDERS_IN_FLIGHT = 2  # steps rendered or waiting to be: the step thread runs at most this far ahead


@dataclass
class StepOutcome:
    deliveries: list[tuple[Request, Update | Failure, int]] = field(default_factory=list)  # (req, update, nfe)
    events: list[SlotStep] = field(default_factory=list)  # the step's, rendered into deliveries
    stopped: list[Request] = field(default_factory=list)  # ended by rendering (a stop string): leave the batch
    timeouts: list[Request] = field(default_factory=list)  # past their deadline: rendered as "timeout" results
    admitted: list[Request] = field(default_factory=list)  # joined the batch in this step
    batch_size: int = 0
    duration: float = 0.0
    failed: bool = False


class Engine:
    """Owns the model; requests enter through `submit` and leave through their group's queue."""

    def __init__(self, runtime: Runtime, metrics: Metrics, config: EngineConfig) -> None:
        self.runtime, self.metrics = runtime, metrics
        loaded = runtime.loaded
        self.core = EngineCore.create(loaded.model, loaded.mask_id, config, loaded.tokenizer.eos_ids,
                                      compute_dtype(loaded.model))
        self.batch: DenoiseBatch = self.core.batch
        self._pool_counted = (0, 0)  # the prefix pool's (queries, hits) already in the metrics
        self.scheduler = self.core.scheduler  # admission: read here for the gauges and /health
        self.state: State = "ready"
        self._output = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tzd-output")  # in order: one thread
        # the step thread runs at most RENDERS_IN_FLIGHT steps ahead of their dispatch on the event loop
        self._in_flight = threading.BoundedSemaphore(RENDERS_IN_FLIGHT)
        self._pending = 0  # steps handed to the output thread and not dispatched yet (under _pending_lock)
        self._pending_lock = threading.Lock()
        self._work = threading.Event()  # a request arrived or left: the step thread looks again
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Event | None = None
        self._task: asyncio.Task | None = None  # on the event loop: done once the step thread has ended

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the step thread: it warms the model up with one tiny request, then steps while there is work."""
        self._loop = asyncio.get_running_loop()
        self._ended = asyncio.Event()
        started = self._loop.create_future()
        self._thread = threading.Thread(target=self._step_loop, args=(started,), name="tzd-step", daemon=True)
        self._thread.start()
        await started  # the warm-up's exception, if any
        self._task = asyncio.create_task(self._ended.wait(), name="tzd-engine")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self.state != "dead"

    async def drain(self, timeout: float) -> bool:
        """Stop admitting; wait up to `timeout` s for in-flight requests; fail what is left. True if all finished."""
        if self.state == "ready":
            self.state = "draining"
        deadline = time.monotonic() + timeout
        while self._busy() and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        clean = not self._busy()
        if not clean:
            self._fail_all("the server shut down before this request finished")
        return clean

    async def stop(self) -> None:
        self._stopping = True
        self._work.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)  # let a running step end
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self._output.shutdown, wait=True)

    def _busy(self) -> bool:
        """Requests waiting or running, or updates still being rendered."""
        return self.core.has_work() or self._pending > 0

    # ---- requests --------------------------------------------------------------------------------

    def submit(self, group: RequestGroup) -> None:
        """Queue the group's requests (all or none); raises Unavailable or QueueFull."""
        if self.state != "ready" or not self.alive:
            raise Unavailable(self.state if self.state != "ready" else "dead")
        try:
            self.core.submit(group.requests)
        except core_scheduler.QueueFull as e:
            raise QueueFull(str(e)) from None
        self._gauges()
        self._work.set()

    def cancel(self, group: RequestGroup) -> None:
        """The client went away: its requests leave (waiting ones now, running ones at the next boundary)."""
        for req in group.requests:
            if not req.done:
                self.core.cancel(req)
        group.queue.put_nowait(CANCELLED)
        self._gauges()
        self._work.set()

    # ---- the loop --------------------------------------------------------------------------------

    def _step_loop(self, started: asyncio.Future) -> None:
        """The step thread: the core's steps back to back while there is work (the event loop is never on
        this path: it only queues requests and dispatches rendered updates), each step's outcome handed to
        the output thread, whose results reach the loop in step order."""
        loop = self._loop
        try:
            self._warmup()
        except BaseException as e:  # noqa: BLE001 - start() raises it
            loop.call_soon_threadsafe(started.set_exception, e)
            loop.call_soon_threadsafe(self._ended.set)
            return
        loop.call_soon_threadsafe(started.set_result, None)
        try:
            while not self._stopping:
                self._work.clear()
                if not self.core.has_work():
                    self._work.wait()
                    continue
                outcome = self._step()
                self._in_flight.acquire()
                with self._pending_lock:
                    self._pending += 1
                future = self._output.submit(self._render_updates, outcome)
                future.add_done_callback(lambda f: loop.call_soon_threadsafe(self._rendered, f))
        except Exception:  # a bug outside the step: say so everywhere instead of hanging requests
            log.exception("the engine loop died")
            loop.call_soon_threadsafe(self._die, "the engine stopped")
        finally:
            loop.call_soon_threadsafe(self._ended.set)

    def _die(self, message: str) -> None:
        self.state = "dead"
        self._fail_all(message)

    def _rendered(self, future: Future) -> None:
        """On the loop, in step order (one output thread): the rendered step's updates to their requests."""
        with self._pending_lock:
            self._pending -= 1
        self._in_flight.release()
        if future.cancelled():
            return
        try:
            outcome: StepOutcome = future.result()
            self._dispatch(outcome)
            for req in outcome.stopped:  # still in the batch: it leaves at the next step
                self.core.abort(req)
        except Exception:  # a bug outside one request's rendering: say so everywhere instead of hanging
            log.exception("rendering or dispatching a step failed")
            self._stopping = True
            self._work.set()
            self._die("the engine stopped")
            return
        if outcome.stopped:
            self._work.set()

    def _render_updates(self, out: StepOutcome) -> StepOutcome:
        """On the output thread: each event of the step as its request's update."""
        for ev in out.events:
            req: Request = ev.handle
            if req.cancelled or req.output.finished:  # gone, or a stop string ended it a step ago
                continue
            try:
                up: Update | Failure = req.output.on_step(ev)
            except Exception as e:  # noqa: BLE001 - a rendering bug fails one request only
                log.exception("rendering a step of %s (request id %s) failed", req.group.id, req.group.request_id)
                req.output.finished = True
                up = Failure(f"internal error rendering the step: {type(e).__name__}: {e}")
            if not ev.done and (isinstance(up, Failure) or up.result is not None):
                out.stopped.append(req)  # a stop string (or a failure) ended it before the sampler did
            out.deliveries.append((req, up, ev.nfe))
        for req in out.timeouts:
            if not req.output.finished:  # not ended by a step rendered just before
                nfe = req.output.nfe  # as of its last step: every earlier step was rendered before this
                out.deliveries.append((req, req.output.on_timeout(nfe), nfe))
        out.events, out.timeouts = [], []
        return out

    def _step(self) -> StepOutcome:
        """On the step thread: one step of the core (leave, join, run); its events are rendered on the
        output thread."""
        with inference(self.runtime):
            core: CoreStep = self.core.step()
        now = time.perf_counter()
        out = StepOutcome(batch_size=core.batch_size, duration=core.duration, events=core.events,
                          admitted=core.admitted, failed=core.error is not None)
        for r in core.admitted:
            if r.admitted is None:  # not again when a preempted request runs again
                r.admitted = now
                self.metrics.queue_time.observe(now - r.arrival)
        if core.preempted:
            self.metrics.preemptions.inc(len(core.preempted))
        if core.replayed:
            self.metrics.recomputed_steps.inc(core.replayed)
        out.timeouts = [r for r in core.expired if not r.cancelled]
        if out.timeouts:
            self.metrics.timeouts.inc(len(out.timeouts))
        for r, e in core.not_started:
            log.error("could not add request %s (request id %s): %s: %s", r.group.id, r.group.request_id,
                      type(e).__name__, e)
            out.deliveries.append((r, Failure(f"could not start: {type(e).__name__}: {e}"), 0))
        if core.error is not None:
            e = core.error
            log.error("a denoising step failed; failing its %d requests", len(core.failed),
                      exc_info=(type(e), e, e.__traceback__))
            fail = Failure(f"denoising step failed: {type(e).__name__}: {e}")
            out.deliveries += [(r, fail, r.nfe) for r in core.failed if not r.cancelled]
        return out

    def _dispatch(self, out: StepOutcome) -> None:
        """On the event loop: timings, metrics, and each update to its request's queue."""
        m, now = self.metrics, time.perf_counter()
        if out.batch_size:
            m.batch_size.observe(out.batch_size)
            if out.failed:
                m.step_errors.inc()
            else:
                m.step_duration.observe(out.duration)
        for req, up, nfe in out.deliveries:
            if req.done:  # already failed (shutdown) while this step ran
                continue
            m.forward_passes.inc(max(nfe - req.nfe, 0))  # a preempted request's recomputation counts once
            req.nfe = max(req.nfe, nfe)
            if isinstance(up, Failure):
                req.finished = now
            else:
                if req.first_step is None and nfe > 0:  # not a request that timed out waiting
                    req.first_step = now
                    m.time_to_first_step.observe(now - req.arrival)
                if up.result is not None:
                    req.finished = now
                    req.generated, req.finish_reason = len(up.result.tokens), up.result.finish_reason
                    m.latency.observe(now - req.arrival)
                    m.prompt_tokens.inc(len(req.prompt_ids))
                    m.generated_tokens.inc(len(up.result.tokens))
                    m.tokens_per_forward.observe(up.result.committed / max(up.result.nfe, 1))
                    m.early_exit_saved.inc(up.result.nfe_saved)
            if not req.cancelled and req.group.queue.put_nowait((req, up)):
                m.stream_coalesced.inc()
        self._gauges()

    def _fail_all(self, message: str) -> None:
        for req in self.core.drain_all():
            req.finished = time.perf_counter()
            if not req.cancelled:
                req.group.queue.put_nowait((req, Failure(message)))
        self._gauges()

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV pages the running requests hold (the scheduler's count: it admits by it)."""
        return self.scheduler.running_pages / max(self.batch.kv.num_pages, 1)

    def check_fits(self, plan: RequestPlan) -> None:
        """InvalidRequest when `plan` needs more KV pages than the whole cache holds (it could never run)."""
        kv, need = self.batch.kv, self.batch.pages_for(plan)
        if need > kv.num_pages:
            raise InvalidRequest("max_tokens", f"max_tokens: prompt + max_tokens = {plan.total_len} positions need "
                                               f"{need} KV pages of {kv.page_size}, but this server's KV cache "
                                               f"(--kv-cache-memory) holds {kv.num_pages}; ask for fewer tokens "
                                               "or cache=none")

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_usage.set(self.kv_usage)
        pool = self.batch.pool
        if pool is not None:  # plain ints the step thread bumps: a read mid-step lags one step at most
            queries, hits = pool.stats.queries, pool.stats.hits
            self.metrics.prefix_queries.inc(queries - self._pool_counted[0])
            self.metrics.prefix_hits.inc(hits - self._pool_counted[1])
            self._pool_counted = (queries, hits)
            self.metrics.prefix_bytes.set(pool.bytes)

    def _warmup(self) -> None:
        """One tiny request through the batch, so the first real request does not pay for lazy init."""
        n = min(2, self.runtime.context - 1)
        mc = self.runtime.loaded.model_config
        p = plan(SamplingParams(max_tokens=n, steps=n, seed=0), 1, self.runtime.context, mc.denoise_block,
                 mc.block_align == "absolute")
        handle = object()
        with inference(self.runtime):
            self.batch.add([0], p, handle=handle)  # any id will do: the output is thrown away
            while len(self.batch):
                self.batch.step()
