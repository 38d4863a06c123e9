"""Replicas behind the load balancer, for real (docker/test.sh runs it against docker-compose.scale.yml).

    python docker/scale_test.py --lb URL --lb-one URL --replica CID_A --replica CID_B [--api-key KEY]
                                [--requests 200] [--concurrency 16] [--out results.json]

Uses the SDK (AsyncTZDClient, with its retries on 503 and refused connections) as a user would:
1. resilience: --requests requests (every second one streamed) at --concurrency through the LB while the
   second replica is stopped with SIGTERM (`docker stop`: it drains) in the middle and started again.
   Checks: no request fails at the client (SDK retries are counted, not failures); both replicas served
   requests (their own tzd_requests_total); the draining replica left the LB's rotation within 5 s of
   SIGTERM, exited 0, became healthy again and rejoined the rotation (LB retries reported); every stream
   arrived step by step through the proxy (the span of its step events' arrivals is at least half the
   span of their writing, which the server stamps on each event as `elapsed`; a buffering proxy delivers
   them all at once). A stream whose burst a stall of this client's own event loop explains by
   itself is left out and counted; more than a quarter left out fails too.
2. measurement (printed and written to --out, never asserted: this machine's cores are shared): the first
   replica at --concurrency, half of the requests direct (its published port) and half at the same time
   through a second LB whose only backend is that replica (--lb-one), each half from its own client
   process: the proxy's cost on p50 latency and on
   the per-step cadence of streams (gaps between step events, p90), and on a GET /health round trip; then
   both replicas through the LB against the replica direct, one after the other (throughput; on a 2-core
   machine the replicas share the cores, so this shows the proxy's cost, not a speed-up).
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the SDK from this checkout

from clients import AsyncTZDClient, RetryPolicy  # noqa: E402
from clients.client import Completion, StepEvent  # noqa: E402
from clients.errors import APIError  # noqa: E402

PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nWe are", "KING HENRY:\nOnce more", "HAMLET:\nTo be"]


def now() -> float:
    """CLOCK_MONOTONIC: system-wide on Linux, so the two client processes of a measurement share it."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class CountingRetry(RetryPolicy):
    """The SDK's default policy; counts the retries it decides on (allowed, and reported)."""

    decided: list[str] = []  # one entry per retry: the error's text  # noqa: RUF012 - shared on purpose

    def delay(self, attempt: int, error: APIError, *, sent: bool, idempotent: bool) -> float | None:
        d = super().delay(attempt, error, sent=sent, idempotent=idempotent)
        if d is not None:
            CountingRetry.decided.append(str(error)[:120])
        return d


@dataclasses.dataclass
class Record:
    index: int
    streamed: bool
    start: float
    end: float = 0.0
    error: str | None = None
    tokens: int = 0
    step_times: list[float] = dataclasses.field(default_factory=list)  # arrival of each step event
    sent_times: list[float | None] = dataclasses.field(default_factory=list)  # each one's writing (server)
    server_total: float | None = None  # the server's own timings (from acceptance)
    server_steps: int = 0  # the steps the server says it took (a stream has one event per step)

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def judged(self) -> bool:
        """Two step events or more, each with the server's time of writing it."""
        return len(self.step_times) >= 2 and None not in self.sent_times

    @property
    def client_span(self) -> float:
        """From the first step event's arrival to the last one's, at this client."""
        return self.step_times[-1] - self.step_times[0]

    @property
    def server_span(self) -> float:
        """From the server's writing of the first step event to its writing of the last."""
        return self.sent_times[-1] - self.sent_times[0]  # type: ignore[operator]


async def one(client: AsyncTZDClient, i: int, streamed: bool, params: dict) -> Record:
    rec = Record(i, streamed, now())
    prompt = PROMPTS[i % len(PROMPTS)]
    try:
        if streamed:
            done: Completion | None = None
            async for ev in client.stream(prompt, **params):
                if isinstance(ev, StepEvent):
                    rec.step_times.append(now())
                    rec.sent_times.append(ev.elapsed)
                else:
                    done = ev
            assert done is not None
        else:
            done = await client.generate(prompt, **params)
        rec.tokens = len(done.tokens)
        rec.server_total = done.timings.total
        rec.server_steps = done.steps
    except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the check
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = now()
    return rec


class LoopWatch:
    """When this client's own event loop ran late: [start, end] of every wake-up of a 5 ms ticker that came
    over `stall` seconds after the one before.

    On the shared 2-core machine the client process itself can be descheduled (a replica booting torch, the
    other replica's step threads); while it is, the step events pile up in its socket and are then read in
    one burst, exactly as if a proxy had buffered them. A stream whose missing spread such a stall explains
    says nothing about the proxy, so the step-by-step check leaves it out (and reports it).
    """

    def __init__(self, stall: float = 0.05, tick: float = 0.005) -> None:
        self.stall, self.tick = stall, tick
        self.stalls: list[tuple[float, float]] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        last = now()
        while True:
            await asyncio.sleep(self.tick)
            t = now()
            if t - last > self.stall:
                self.stalls.append((last, t))
            last = t

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def worst_within(self, start: float, end: float) -> float:
        """The longest stall overlapping [start, end] (0 when none)."""
        return max((min(b, end) - max(a, start) for a, b in self.stalls if a < end and b > start), default=0.0)


async def load(url: str, api_key: str | None, n: int, concurrency: int, params: dict,
               on_progress=None, watch: LoopWatch | None = None) -> tuple[list[Record], float]:  # noqa: ANN001
    """n requests (every second one streamed) with `concurrency` in flight; (records, wall seconds).

    With `watch`, the client's own loop stalls are recorded while the requests run.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    records: list[Record] = []
    async with AsyncTZDClient(url, api_key=api_key, retry=CountingRetry()) as client:
        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                records.append(await one(client, i, i % 2 == 0, params))
                if on_progress is not None:
                    on_progress(len(records))

        t0 = now()
        if watch is not None:
            watch.start()
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            if watch is not None:
                await watch.stop()
        return sorted(records, key=lambda r: r.index), now() - t0


async def load_in_process(url: str, api_key: str | None, n: int, concurrency: int, params: dict,
                          start: float) -> list[Record]:
    """load() in a child process (this file with --worker), from the moment `start` on."""
    cmd = [sys.executable, __file__, "--worker", url, "--worker-requests", str(n), "--concurrency", str(concurrency),
           "--max-tokens", str(params["max_tokens"]), "--start", repr(start)]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE,
                                                env={**os.environ, "TZD_API_KEY": api_key or ""})
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring client for {url} exited {proc.returncode}")
    return [Record(**json.loads(line)) for line in out.decode().splitlines() if line.strip()]


def worker_main(argv: list[str]) -> int:
    """--worker URL: load() from --start on, one JSON Record a line on stdout (a half of measure())."""
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--worker-requests", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--start", type=float, required=True)
    args = p.parse_args(argv)
    params = {"max_tokens": args.max_tokens, "steps": args.max_tokens, "seed": 1}

    async def run() -> list[Record]:
        await asyncio.sleep(max(0.0, args.start - now()))
        key = os.environ.get("TZD_API_KEY") or None
        return (await load(args.worker, key, args.worker_requests, args.concurrency, params))[0]

    for rec in asyncio.run(run()):
        print(json.dumps(dataclasses.asdict(rec)))
    return 0


# ---- docker and the replicas' own endpoints -----------------------------------------------------------

DOCKER = ["docker"]  # --docker


def docker(*args: str) -> str:
    return subprocess.run([*DOCKER, *args], check=True, capture_output=True, text=True).stdout.strip()


def replica_url(cid: str) -> str:
    """The replica's published port (it changes when the container is started again)."""
    return "http://" + docker("port", cid, "8000/tcp").splitlines()[0].replace("0.0.0.0", "127.0.0.1")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def requests_total(cid: str) -> float:
    """Sum of the replica's tzd_requests_total over endpoints and statuses."""
    status, text = http_get(replica_url(cid) + "/metrics")
    assert status == 200, f"{cid[:12]} /metrics: {status}"
    return sum(float(m.group(1)) for m in re.finditer(r"^tzd_requests_total\{[^}]*\} (\S+)$", text, re.M))


def lb_stats(stats_url: str) -> dict[str, dict[str, str]]:
    """The LB's rows for the replicas backend, by server name (HAProxy's stats CSV: status, addr, wretr...)."""
    text = urllib.request.urlopen(stats_url + "/stats;csv", timeout=5).read().decode().lstrip("# ")
    return {r["svname"]: r for r in csv.DictReader(io.StringIO(text)) if r["pxname"] == "replicas"}


def in_rotation(stats_url: str, ip: str) -> bool:
    return any(r["addr"].startswith(ip + ":") and r["status"].startswith("UP") for r in lb_stats(stats_url).values())


async def wait_rotation(stats_url: str, ip: str, want: bool, timeout: float = 120) -> float:
    """Seconds until the replica at `ip` is (want=True) or is no longer (want=False) UP in the LB."""
    t0 = now()
    while now() - t0 < timeout:
        if await asyncio.to_thread(in_rotation, stats_url, ip) == want:
            return now() - t0
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{ip} {'never came back into' if want else 'never left'} the LB's rotation")


def container_ip(cid: str) -> str:
    return docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", cid).split()[0]


async def wait_healthy(cid: str, timeout: float = 240) -> float:
    t0 = now()
    while now() - t0 < timeout:
        try:
            if (await asyncio.to_thread(lambda: http_get(replica_url(cid) + "/health")))[0] == 200:
                return now() - t0
        except subprocess.CalledProcessError:
            pass  # not published yet
        await asyncio.sleep(0.2)
    raise TimeoutError(f"replica {cid[:12]} not healthy within {timeout} s")


# ---- figures ----------------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def summary(records: list[Record], wall: float) -> dict:
    lat = [r.latency for r in records if r.error is None]
    gaps = [b - a for r in records for a, b in zip(r.step_times, r.step_times[1:], strict=False)]
    return {"requests": len(records), "failed": sum(r.error is not None for r in records),
            "wall_s": round(wall, 2), "req_per_s": round(len(lat) / wall, 2),
            "tokens_per_s": round(sum(r.tokens for r in records) / wall, 1),
            "latency_p50_s": round(pct(lat, 50), 4), "latency_p90_s": round(pct(lat, 90), 4),
            "latency_max_s": round(max(lat, default=float("nan")), 4),
            "step_gap_p50_ms": round(1000 * pct(gaps, 50), 2), "step_gap_p90_ms": round(1000 * pct(gaps, 90), 2),
            # the client's latency less the server's own (from acceptance to the answer): connecting, the
            # proxy, the transport and the client's parsing; the batch the request ran in cancels out
            "outside_server_p50_ms": round(1000 * pct([r.latency - r.server_total for r in records
                                                       if r.server_total is not None], 50), 2)}


def event_delays(via: list[Record], direct: list[Record]) -> list[float]:
    """For each step event through the proxy, its arrival less the nearest arrival of a direct stream's event.

    Both halves ran in the same batches, and the engine hands every request of a step its event at the same
    moment, so this is how much later the proxy delivered that step (events farther apart than half a step
    belong to different steps and are left out).
    """
    ref = sorted(t for r in direct for t in r.step_times)
    gaps = [b - a for r in direct for a, b in zip(r.step_times, r.step_times[1:], strict=False)]
    if not ref or not gaps:
        return []
    window = 0.5 * pct(gaps, 50)
    out = []
    for t in (t for r in via for t in r.step_times):
        i = bisect.bisect_left(ref, t)
        near = min((ref[j] for j in (i - 1, i) if 0 <= j < len(ref)), key=lambda x: abs(x - t))
        if abs(t - near) < window:
            out.append(t - near)
    return out


def stepwise(r: Record) -> bool:
    """The stream's step events arrived spread out as the server wrote them, not in one burst: the span of
    their arrivals is at least half the span of their writing (the server's `elapsed` on each event; a delay
    inside the server, before it writes an event, moves both alike and says nothing of the proxy)."""
    return r.judged and r.client_span >= 0.5 * r.server_span


# ---- the two parts ------------------------------------------------------------------------------------

async def resilience(args: argparse.Namespace, params: dict) -> tuple[dict, list[str]]:
    cid_a, cid_b = args.replica
    problems: list[str] = []
    events: dict[str, float] = {}
    chaos: dict = {}
    started = asyncio.Event()
    trigger = max(1, args.requests // 4)  # early enough that the replica is back before the run ends

    def progress(done: int) -> None:
        if done >= trigger:
            started.set()

    async def stop_and_start() -> None:
        # Every docker and HTTP call here blocks, so each runs in a thread: on the event loop they would stall
        # the streams' reads and make their events arrive in a burst, which is what the check looks for.
        await started.wait()
        chaos["b_requests_before_sigterm"] = await asyncio.to_thread(requests_total, cid_b)
        ip = await asyncio.to_thread(container_ip, cid_b)
        events["sigterm"] = now()
        proc = await asyncio.create_subprocess_exec(*DOCKER, "stop", cid_b,  # its stop_grace_period
                                                    stdout=subprocess.DEVNULL)
        chaos["left_rotation_after_sigterm_s"] = round(await wait_rotation(args.lb_stats, ip, want=False), 2)
        await proc.wait()
        events["exited"] = now()
        chaos["exit_code"] = int(await asyncio.to_thread(docker, "inspect", "-f", "{{.State.ExitCode}}", cid_b))
        await asyncio.to_thread(docker, "start", cid_b)
        events["started"] = now()
        await wait_healthy(cid_b)
        events["healthy"] = now()
        chaos["back_in_rotation_after_healthy_s"] = round(
            await wait_rotation(args.lb_stats, await asyncio.to_thread(container_ip, cid_b), want=True), 2)

    lb_before = lb_stats(args.lb_stats)
    task = asyncio.create_task(stop_and_start())
    watch = LoopWatch()
    records, wall = await load(args.lb, args.api_key, args.requests, args.concurrency, params, progress, watch)
    await task
    lb_after = lb_stats(args.lb_stats)
    for key, field in (("lb_retries", "wretr"), ("lb_redispatches", "wredis")):
        chaos[key] = int(lb_after["BACKEND"][field] or 0) - int(lb_before["BACKEND"][field] or 0)
    chaos.update(a_requests=requests_total(cid_a), b_requests_after_restart=requests_total(cid_b),
                 drain_s=round(events["exited"] - events["sigterm"], 2),
                 restart_to_healthy_s=round(events["healthy"] - events["started"], 2),
                 sdk_retries=len(CountingRetry.decided), sdk_retry_errors=sorted(set(CountingRetry.decided)))

    failed = [r for r in records if r.error]
    if failed:
        problems.append(f"{len(failed)} of {len(records)} requests failed at the client, e.g. {failed[0].error}")
    if chaos["left_rotation_after_sigterm_s"] > 5:
        problems.append(f"the draining replica stayed in the LB's rotation {chaos['left_rotation_after_sigterm_s']} s")
    if chaos["exit_code"] != 0:
        problems.append(f"the stopped replica exited {chaos['exit_code']}, not 0")
    if not chaos["a_requests"] > 0 or not chaos["b_requests_before_sigterm"] > 0:
        problems.append(f"not both replicas served: A {chaos['a_requests']}, B {chaos['b_requests_before_sigterm']}")
    streams = [r for r in records if r.streamed and r.error is None]

    def client_stalled(r: Record) -> bool:
        """This client's loop stalled long enough, while r ran, to have compressed its events by itself."""
        if not r.judged:
            return False
        missing = 0.5 * r.server_span - r.client_span
        return watch.worst_within(r.start, r.end) >= missing

    unjudged = [r for r in streams if not stepwise(r) and client_stalled(r)]
    bursty = [r for r in streams if not stepwise(r) and not client_stalled(r)]
    if len(unjudged) > len(streams) // 4:
        problems.append(f"this client stalled during {len(unjudged)} of {len(streams)} streams (longest stall "
                        f"{1000 * max(b - a for a, b in watch.stalls):.0f} ms): too few left to judge the proxy")
    if not streams or bursty:
        detail = ""
        if bursty:
            r = bursty[0]
            detail = (f", e.g. request {r.index}: {1000 * r.client_span:.0f} ms from its first step event to its"
                      f" last at the client, {1000 * r.server_span:.0f} ms between the server writing them"
                      f" (this client's loop stalled {1000 * watch.worst_within(r.start, r.end):.0f} ms at most"
                      f" meanwhile; {1000 * (r.step_times[0] - events.get('sigterm', r.step_times[0])):+.0f} ms"
                      f" from SIGTERM to its first step event)"
                      if r.judged else f", e.g. request {r.index}: under two step events or no server times")
        problems.append(f"{len(bursty)} of {len(streams)} streams did not arrive step by step{detail}")
    wrong_count = [r for r in streams if len(r.step_times) != r.server_steps]
    if wrong_count:
        r = wrong_count[0]
        problems.append(f"{len(wrong_count)} streams lost step events, e.g. {len(r.step_times)} of {r.server_steps}")

    def phase(r: Record) -> str:
        if r.start < events["sigterm"]:
            return "before_sigterm" if r.end < events["sigterm"] else "across_sigterm"
        return "during_drain_and_restart" if r.start < events["healthy"] else "after_restart"

    phases = {}
    for name in ("before_sigterm", "across_sigterm", "during_drain_and_restart", "after_restart"):
        rs = [r for r in records if phase(r) == name]
        lat = [r.latency for r in rs if r.error is None]
        phases[name] = {"requests": len(rs), "latency_p50_s": round(pct(lat, 50), 3),
                        "latency_p90_s": round(pct(lat, 90), 3), "latency_max_s": round(max(lat, default=0), 3)}
    ratios = [r.client_span / r.server_span for r in streams if r.judged and r.server_span > 0]
    result = {"summary": summary(records, wall), "chaos": chaos, "latency_by_phase": phases,
              "streams": {"count": len(streams), "stepwise": len(streams) - len(bursty) - len(unjudged),
                          "not_judged_client_stalled": len(unjudged),
                          "client_loop_stalls": len(watch.stalls),
                          "client_loop_stall_max_ms": round(1000 * max((b - a for a, b in watch.stalls),
                                                                       default=0.0), 1),
                          "arrival_span_over_written_span_min": round(min(ratios, default=0), 3),
                          "first_step_before_done": sum(r.step_times[0] < r.end for r in streams)}}
    return result, problems


async def health_rtt(urls: dict[str, str], pairs: int) -> dict[str, float]:
    """p50 of GET /health round trips, the paths taken in turn (pairs of requests, one connection each)."""
    times: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: httpx.AsyncClient(base_url=url, timeout=10) for name, url in urls.items()}
    try:
        for _ in range(pairs):
            for name, c in clients.items():
                t0 = now()
                (await c.get("/health")).raise_for_status()
                times[name].append(now() - t0)
    finally:
        for c in clients.values():
            await c.aclose()
    return {f"health_rtt_p50_{name}_ms": round(1000 * pct(ts, 50), 3) for name, ts in times.items()}


async def measure(args: argparse.Namespace, params: dict) -> dict:
    """The proxy's cost, on the first replica alone: in each round half of the --concurrency streams go to it
    directly and half through an LB whose only backend it is, at the same time, so both halves share the
    same batches and steps and the machine's drift hits both alike; the difference is the proxy's path."""
    direct, n, c = replica_url(args.replica[0]), args.measure_requests, args.concurrency
    paths = {"direct": direct, "via_lb": args.lb_one}
    await asyncio.gather(*(load(url, args.api_key, c // 2, c // 2, params) for url in paths.values()))  # warm
    mixed: dict[str, list[Record]] = {name: [] for name in paths}
    t0 = now()
    for _ in range(args.rounds):
        # one client process per half: in one event loop the half whose events arrive a little later would
        # also wait behind the other half's parsing, and that would be charged to the proxy
        start = now() + 3.0  # both processes begin together, after their imports
        results = await asyncio.gather(*(load_in_process(url, args.api_key, n // 2, c // 2, params, start)
                                         for url in paths.values()))
        for name, recs in zip(paths, results, strict=True):
            mixed[name] += recs
    wall = now() - t0
    out: dict = {"mixed": {name: summary(recs, wall) for name, recs in mixed.items()}}
    delays = event_delays(mixed["via_lb"], mixed["direct"])
    out.update(await health_rtt(paths, 100))
    # throughput at the same concurrency: one replica direct, then both through the LB (one after the other)
    for name, url in (("direct_one_replica", direct), ("lb_two_replicas", args.lb)):
        recs, wall = await load(url, args.api_key, 2 * n, c, params)
        out[name] = summary(recs, wall)
    d, v = out["mixed"]["direct"], out["mixed"]["via_lb"]
    out["proxy"] = {
        "latency_p50_direct_s": d["latency_p50_s"], "latency_p50_via_lb_s": v["latency_p50_s"],
        "latency_p50_overhead_pct": round(100 * (v["latency_p50_s"] / d["latency_p50_s"] - 1), 2),
        "target_pct": 5.0,
        "step_gap_p90_direct_ms": d["step_gap_p90_ms"], "step_gap_p90_via_lb_ms": v["step_gap_p90_ms"],
        "step_gap_p90_added_ms": round(v["step_gap_p90_ms"] - d["step_gap_p90_ms"], 2), "target_ms": 5.0,
        "outside_server_p50_direct_ms": d["outside_server_p50_ms"],
        "outside_server_p50_via_lb_ms": v["outside_server_p50_ms"],
        "proxy_added_p50_ms": round(v["outside_server_p50_ms"] - d["outside_server_p50_ms"], 2),
        "proxy_added_pct_of_p50": round(100 * (v["outside_server_p50_ms"] - d["outside_server_p50_ms"])
                                        / (1000 * d["latency_p50_s"]), 3),
        "step_event_delay_via_lb_p50_ms": round(1000 * pct(delays, 50), 2),
        "step_event_delay_via_lb_p90_ms": round(1000 * pct(delays, 90), 2), "step_events_paired": len(delays),
        "health_rtt_added_ms": round(out["health_rtt_p50_via_lb_ms"] - out["health_rtt_p50_direct_ms"], 3),
        "throughput_direct_req_s": out["direct_one_replica"]["req_per_s"],
        "throughput_lb_both_req_s": out["lb_two_replicas"]["req_per_s"]}
    return out


async def main_async(args: argparse.Namespace) -> int:
    params = {"max_tokens": args.max_tokens, "steps": args.max_tokens, "seed": 1}
    res, problems = await resilience(args, params)
    for p in problems:
        print(f"FAIL - {p}")
    if not problems:
        s, c = res["summary"], res["chaos"]
        print(f"ok - {s['requests']} requests ({args.requests // 2} streamed) at concurrency {args.concurrency} "
              f"through the LB, one replica stopped (drain {c['drain_s']} s, exit 0) and started again "
              f"(healthy after {c['restart_to_healthy_s']} s): 0 failed, {c['sdk_retries']} SDK retries, "
              f"the LB retried {c['lb_retries']} times and redispatched {c['lb_redispatches']} requests to the other "
              f"replica; the draining replica left "
              f"the rotation {c['left_rotation_after_sigterm_s']} s after SIGTERM; "
              f"replica requests A {c['a_requests']:.0f}, B {c['b_requests_before_sigterm']:.0f} before SIGTERM "
              f"and {c['b_requests_after_restart']:.0f} after the restart; {res['streams']['stepwise']} of "
              f"{res['streams']['count']} streams step by step, {res['streams']['not_judged_client_stalled']} "
              f"not judged (this client's loop stalled {res['streams']['client_loop_stall_max_ms']} ms at most)")
    out = {"params": {**params, "concurrency": args.concurrency, "requests": args.requests}, "resilience": res}
    if args.measure_requests:
        out["measure"] = await measure(args, params)
        print(json.dumps(out["measure"]["proxy"], indent=1))
    print(json.dumps({"latency_by_phase": res["latency_by_phase"], "chaos": res["chaos"]}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 1 if problems else 0


def main() -> int:
    if "--worker" in sys.argv:
        return worker_main(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lb", required=True, help="the LB's published URL (both replicas behind it)")
    p.add_argument("--lb-one", required=True, help="a second LB whose only backend is the first replica")
    p.add_argument("--lb-stats", required=True, help="the LB's stats port (for /stats;csv)")
    p.add_argument("--replica", action="append", required=True, help="container id (twice: A, then B)")
    p.add_argument("--api-key")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16, help="also the steps: one token a step")
    p.add_argument("--measure-requests", type=int, default=32, help="per measurement round (0: no measuring)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--docker", default="docker", help="the docker CLI (DOCKER_HOST from the environment)")
    args = p.parse_args()
    DOCKER[:] = [args.docker]
    if len(args.replica) != 2:
        p.error("--replica: give the two replicas' container ids")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
