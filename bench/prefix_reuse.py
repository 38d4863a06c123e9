"""Prefix reuse across requests on a block-causal model: time to first step with the pool and without.

16 requests whose prompts share a 256-token prefix (a system prompt) and differ in a short suffix
arrive together, as at one step boundary of the server; each request's time to first step is from
that moment to the end of the step that produced its first event. With the pool the first request
computes the shared blocks and the others take them (they wait one step for them rather than computing
them too), so their first steps run only their suffix and first block. The pool holds the blocks' own
pages of the KV store and a request points its page table at them (`pool_on`: the diffusion block a
multiple of --page-size), or copies of their keys/values written into each request's pages
(`pool_on_copy`: pages of --copy-page-size, larger than a block, force it).

    python -m bench.prefix_reuse --checkpoint models/shakespeare-small-bd
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.sampler import held_out_prompts, machine
from server.runtime import inference, load_runtime
from tzd.sampling import DenoiseBatch, SamplingParams, plan


def first_steps(rt, prompts: list[list[int]], params: SamplingParams, pool_bytes: int,  # noqa: ANN001
                page_size: int = 16) -> tuple[list[float], dict]:
    """Seconds from admission to each request's first step event, and the pool's counters."""
    cfg = rt.loaded.model_config
    batch = DenoiseBatch(rt.loaded.model, rt.loaded.mask_id, capacity=len(prompts), prefix_pool_bytes=pool_bytes,
                         kv_page_size=page_size)
    first: dict[int, float] = {}
    with inference(rt):
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            batch.add(p, plan(params, len(p), cfg.context_len, cfg.denoise_block, cfg.block_align == "absolute",
                              rule=cfg.decode_rule), handle=i)
        while len(first) < len(prompts):
            events = batch.step()
            now = time.perf_counter()
            for ev in events:
                first.setdefault(ev.handle, now - t0)
    pool = batch.pool
    stats = ({"hits": pool.stats.hits, "queries": pool.stats.queries, "bytes": pool.bytes,
              "shares_pages": pool.shares_pages, "page_size": page_size} if pool else {})
    return [first[i] for i in range(len(prompts))], stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="models/shakespeare-small-bd")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--suffix-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pool-mb", type=float, default=256)
    ap.add_argument("--page-size", type=int, default=16, help="KV page size (the server's default)")
    ap.add_argument("--copy-page-size", type=int, default=64, help="pages larger than a block: the pool copies")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/prefix_reuse.json")
    args = ap.parse_args()

    rt = load_runtime(args.checkpoint, args.device, args.dtype)
    if not rt.loaded.model_config.block_causal:
        raise SystemExit(f"{args.checkpoint}: not a block-causal model "
                         "(prefix reuse needs model.attention=block_causal)")
    cuts = held_out_prompts(rt.loaded, args.requests + 1, args.prefix_len + args.suffix_len)
    prefix = cuts[0][:args.prefix_len]
    prompts = [prefix + c[:args.suffix_len] for c in cuts[1:]]
    params = SamplingParams(max_tokens=args.max_tokens, cache="dual", seed=1)
    first_steps(rt, prompts[:2], params, 0)  # warm-up
    runs: dict[str, list[list[float]]] = {"pool_off": [], "pool_on": [], "pool_on_copy": []}
    stats, copy_stats = {}, {}
    pool = int(args.pool_mb * (1 << 20))
    for _ in range(args.repeats):  # alternate, so that drifting load hits all alike
        runs["pool_off"].append(first_steps(rt, prompts, params, 0, args.page_size)[0])
        ttfs, stats = first_steps(rt, prompts, params, pool, args.page_size)
        runs["pool_on"].append(ttfs)
        ttfs, copy_stats = first_steps(rt, prompts, params, pool, args.copy_page_size)
        runs["pool_on_copy"].append(ttfs)
    summary = {k: {"mean_s": statistics.mean(x for r in v for x in r),
                   "median_s": statistics.median(x for r in v for x in r),
                   "max_s": statistics.mean(max(r) for r in v)} for k, v in runs.items()}
    summary["mean_speedup"] = summary["pool_off"]["mean_s"] / summary["pool_on"]["mean_s"]
    summary["median_speedup"] = summary["pool_off"]["median_s"] / summary["pool_on"]["median_s"]
    summary["copy_mean_speedup"] = summary["pool_off"]["mean_s"] / summary["pool_on_copy"]["mean_s"]
    result = {"checkpoint": args.checkpoint, "requests": args.requests, "prefix_len": args.prefix_len,
              "suffix_len": args.suffix_len, "max_tokens": args.max_tokens, "repeats": args.repeats,
              "dtype": rt.dtype_name, "machine": machine(rt.device), "pool_last_run": stats,
              "copy_pool_last_run": copy_stats, **summary,
              "runs": runs}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
