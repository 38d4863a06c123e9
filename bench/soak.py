"""Soak and slow-reader checks of `python -m server`, loopback only, bounded in count and time.

soak: N mixed requests at a fixed concurrency against a server this script starts: plain and streamed
/generate, OpenAI completions (n=2, some streamed), slow readers (a pause between events), dropped streams
(closed after the first event), bad fields, malformed JSON and 1 MB prompts. Reports answers by kind and
status, 5xx, hangs (no end within --request-deadline), tzd_requests_running once the load stops, and the
server's RSS at the 500th request and at the end.

slow-reader: one stream of --slow-steps steps whose reader takes --slow-read-bytes every --slow-interval
seconds (a raw socket with a 4 KB receive buffer), the app run in this process so that its queued updates
can be weighed (their JSON bytes), sampled every 0.2 s.

    python bench/soak.py soak [--requests 2000] [--concurrency 64] [--checkpoint models/shakespeare-small]
    python bench/soak.py slow-reader [--slow-steps 256] [--slow-interval 1.0]
Both print one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from httpx_sse import aconnect_sse  # noqa: E402

from server.config import DEFAULT_CHECKPOINT, resolve_checkpoint  # noqa: E402

KINDS = [("generate", 30), ("stream", 15), ("completions", 10), ("completions_stream", 5), ("slow_reader", 10),
         ("dropped_stream", 10), ("bad_field", 10), ("malformed_json", 5), ("huge_prompt", 5)]
PROMPTS = ["ROMEO:\nBut soft, what light", "JULIET:\nO Romeo, Romeo", "KING:\nNow is the winter",
           "First Citizen:\nBefore we proceed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
    """Send one request of `kind`; returns its outcome label ("200", "400", "dropped", ...)."""
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.choice([8, 16, 24]), "steps": 8,
            "seed": rng.randrange(1 << 30)}
    if kind == "generate":
        return str((await client.post("/generate", json=body)).status_code)
    if kind == "completions":
        return str((await client.post("/v1/completions", json={**body, "n": 2})).status_code)
    if kind == "bad_field":
        bad = rng.choice([{"max_tokens": 0}, {"steps": 999}, {"temprature": 1}, {"cache": "all"}, {"prompt": 5}])
        return str((await client.post("/generate", json={**body, **bad})).status_code)
    if kind == "malformed_json":
        r = await client.post("/generate", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
        return str(r.status_code)
    if kind == "huge_prompt":
        return str((await client.post("/generate", json={**body, "prompt": "a" * (1 << 20)})).status_code)
    path = "/v1/completions" if kind == "completions_stream" else "/generate"
    async with aconnect_sse(client, "POST", path, json={**body, "stream": True}) as source:
        if source.response.status_code != 200:
            await source.response.aread()
            return str(source.response.status_code)
        events = 0
        async for sse in source.aiter_sse():
            events += 1
            if kind == "dropped_stream":
                return "dropped"  # leaving the block closes the connection mid-stream
            if kind == "slow_reader":
                await asyncio.sleep(rng.uniform(0.05, 0.3))
            if sse.event in ("done", "error") or sse.data == "[DONE]":
                return "200" if sse.event != "error" else "stream_error"
        return "stream_cut"


async def soak(url: str, pid: int, n: int, concurrency: int, deadline: float, seed: int) -> dict:
    rng = random.Random(seed)
    names, weights = zip(*KINDS, strict=True)
    plan = rng.choices(names, weights, k=n)
    outcomes: Counter[tuple[str, str]] = Counter()
    rss: dict[str, float] = {"start": rss_mb(pid)}
    done, next_index, peak = 0, 0, rss["start"]
    lock = asyncio.Lock()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done, next_index, peak
        while True:
            async with lock:
                if next_index >= n:
                    return
                i, next_index = next_index, next_index + 1
            kind = plan[i]
            try:
                label = await asyncio.wait_for(one(client, kind, random.Random(seed + i)), deadline)
            except TimeoutError:
                label = "hang"
            except httpx.HTTPError as e:
                label = f"transport:{type(e).__name__}"
            outcomes[kind, label] += 1
            done += 1
            if done == 500:
                rss["at_500"] = rss_mb(pid)
            if done % 50 == 0:
                peak = max(peak, rss_mb(pid))

    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(deadline, connect=30), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    rss["end"] = rss_mb(pid)
    rss["peak_sampled"] = max(peak, rss["end"])
    settle = time.monotonic()
    while gauge(url, "tzd_requests_running") and time.monotonic() - settle < 30:
        await asyncio.sleep(0.2)
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, label), count in sorted(outcomes.items()):
        by_kind.setdefault(kind, {})[label] = count
    statuses = Counter(label for (_, label), c in outcomes.items() for _ in range(c))
    return {"requests": n, "concurrency": concurrency, "seconds": round(elapsed, 1), "outcomes": by_kind,
            "5xx": sum(c for label, c in statuses.items() if label.startswith("5")),
            "hangs": statuses.get("hang", 0), "transport_errors": sum(c for label, c in statuses.items()
                                                                      if label.startswith("transport")),
            "requests_running_after": gauge(url, "tzd_requests_running"),
            "requests_waiting_after": gauge(url, "tzd_requests_waiting"),
            "rss_mb": {k: round(v, 1) for k, v in rss.items()},
            "rss_growth_500_to_end_mb": round(rss["end"] - rss.get("at_500", rss["end"]), 1)}


def run_soak(args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(args.checkpoint), "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log = open(args.log, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: see {args.log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > 180:
                raise TimeoutError("server not healthy after 180 s")
            time.sleep(0.2)
        out = asyncio.run(soak(url, proc.pid, args.requests, args.concurrency, args.request_deadline, args.seed))
        out["checkpoint"] = str(args.checkpoint)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_slow_reader(args: argparse.Namespace) -> dict:
    """One stream read at one event per --slow-interval seconds; the app's queued updates weighed meanwhile."""
    import uvicorn

    import server.request as request_module
    from server.app import create_app
    from server.config import ServerConfig

    groups: list = []
    real_init = request_module.RequestGroup.__init__

    def tracked_init(self, *a, **kw) -> None:  # noqa: ANN001, ANN002, ANN003 - bench instrumentation only
        real_init(self, *a, **kw)
        groups.append(self)

    request_module.RequestGroup.__init__ = tracked_init  # type: ignore[method-assign]
    cfg = ServerConfig(checkpoint=args.checkpoint, max_tokens_limit=max(256, args.slow_steps),
                       threads=args.threads)
    app = create_app(cfg)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    samples: list[int] = []
    stop = threading.Event()
    generated_at: dict[str, float] = {}
    t0 = time.monotonic()

    def weigh() -> None:  # the queued updates' JSON bytes, and when the generation itself ended
        while not stop.is_set():
            total = 0
            for g in list(groups):
                for item in g.queue.items():
                    up = item[1] if isinstance(item, tuple) else None
                    if up is not None and getattr(up, "event", None) is not None:
                        total += len(up.event.model_dump_json())
                if g.requests and g.requests[0].done and "done" not in generated_at:
                    generated_at["done"] = time.monotonic() - t0
            samples.append(total)
            time.sleep(0.2)

    threading.Thread(target=weigh, daemon=True).start()
    body = json.dumps({"prompt": "ROMEO:\nBut soft", "max_tokens": args.slow_steps, "steps": args.slow_steps,
                       "block_length": 32, "stream": True, "seed": 1}).encode()
    rss_before = rss_mb(os.getpid())
    # a raw socket with a small receive buffer, read a little at a time: the reader's slowness reaches the
    # server at once instead of being soaked up by client-side buffers
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    # HTTP/1.0: the answer's body is the event stream itself, not cut into chunks
    sock.sendall(b"POST /generate HTTP/1.0\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    t0 = time.monotonic()
    received, events, steps_seen = b"", 0, []
    while b"event: done" not in received and time.monotonic() - t0 < args.slow_budget:
        time.sleep(args.slow_interval)
        chunk = sock.recv(args.slow_read_bytes)
        if not chunk:
            break
        received += chunk
        events = received.count(b"event: ")
    sock.close()
    elapsed = time.monotonic() - t0
    for line in received.split(b"\n")[:-1]:  # the last may be cut
        if line.startswith(b'data: {"step"'):
            steps_seen.append(json.loads(line[6:])["step"])
    stop.set()
    server.should_exit = True
    return {"steps": args.slow_steps, "read_interval_s": args.slow_interval, "read_bytes": args.slow_read_bytes,
            "events_received": events, "step_events_received": len(steps_seen),
            "last_step_received": max(steps_seen, default=None), "done_received": b"event: done" in received,
            "generation_done_after_s": generated_at.get("done"), "read_for_s": round(elapsed, 1),
            "queued_bytes_max": max(samples, default=0), "queued_bytes_samples": len(samples),
            "backlog_limit_updates": request_module.STREAM_BACKLOG,
            "process_rss_growth_mb": round(rss_mb(os.getpid()) - rss_before, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=["soak", "slow-reader"])
    p.add_argument("--checkpoint", type=resolve_checkpoint, default=resolve_checkpoint(DEFAULT_CHECKPOINT))
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--request-deadline", type=float, default=300.0, help="seconds before a request counts as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow-steps", type=int, default=256)
    p.add_argument("--slow-interval", type=float, default=1.0)
    p.add_argument("--slow-budget", type=float, default=120.0, help="seconds the slow reader reads at most")
    p.add_argument("--slow-read-bytes", type=int, default=1024, help="bytes the slow reader takes per read")
    p.add_argument("--log", default="/tmp/tzd-soak-server.log")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = run_soak(args) if args.scenario == "soak" else run_slow_reader(args)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
