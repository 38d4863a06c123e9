"""Accuracy next to speed: every sampler config on a task's test split, the way the field reports it.

Per config: exact-match accuracy on the test split (at batch 16; the sampler is batch-invariant, so
batch 1 writes the same tokens), tokens/s at batch 1 (the first --b1-examples examples one at a time)
and at batch 16 (the whole split), forwards per generated token (TPF) and seconds per sample. Tokens
are the canvas (max_tokens per example, EOS padding included, as Fast-dLLM and dInfer count them);
answer tokens (before the first EOS) are reported beside them. One JSON, one PNG (accuracy against
tokens/s at batch 1, the Pareto front marked).

    python -m bench.accuracy --model models/addition-small
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.sampler import machine
from server.runtime import inference, load_runtime
from tzd.sampling import SamplingParams
from tzd.tasks import task_of_checkpoint
from tzd.tasks.score import TaskScore, baseline_params, score_task

# (name, overrides of the baseline); steps as a fraction of max_tokens; "whole_canvas": no row ends at
# its EOS (LLaDA's reference loop: every position denoised), the reference the speedups are against
CONFIGS: list[tuple[str, dict]] = [
    ("LLaDA baseline (whole canvas)", {"whole_canvas": True}),
    ("baseline", {}),
    ("steps/2", {"steps": 0.5}),
    ("threshold 0.9", {"threshold": 0.9}),
    ("threshold 0.7", {"threshold": 0.7}),
    ("threshold 0.5", {"threshold": 0.5}),
    ("dual", {"cache": "dual"}),
    ("threshold 0.9 + dual", {"threshold": 0.9, "cache": "dual"}),
    ("threshold 0.7 + dual", {"threshold": 0.7, "cache": "dual"}),
    ("threshold 0.5 + dual", {"threshold": 0.5, "cache": "dual"}),
    ("EB 0.1", {"entropy_bound": 0.1}),
    ("EB 0.5", {"entropy_bound": 0.5}),
    ("EB 1.0", {"entropy_bound": 1.0}),
    ("EB 0.5 + dual", {"entropy_bound": 0.5, "cache": "dual"}),
    # early_exit is on by default (a row ends once an EOS sits in its committed left part): these turn it off
    ("threshold 0.9, early exit off", {"threshold": 0.9, "early_exit": False}),
    ("threshold 0.9 + dual, early exit off", {"threshold": 0.9, "cache": "dual", "early_exit": False}),
    ("EB 0.5 + dual, early exit off", {"entropy_bound": 0.5, "cache": "dual", "early_exit": False}),
]


def params_for(base: SamplingParams, overrides: dict) -> SamplingParams:
    fields = {**base.model_dump(), **{k: v for k, v in overrides.items() if k != "whole_canvas"}}
    if isinstance(overrides.get("steps"), float):
        fields["steps"] = max(1, round(base.max_tokens * overrides["steps"]))
    return SamplingParams(**fields)


def timed(fn):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def pareto(rows: list[dict]) -> set[str]:
    """Configs that no other config beats on both accuracy and batch-1 tokens/s."""
    return {r["config"] for r in rows if not any(
        o["accuracy"] >= r["accuracy"] and o["tok_s_b1"] >= r["tok_s_b1"]
        and (o["accuracy"], o["tok_s_b1"]) != (r["accuracy"], r["tok_s_b1"]) for o in rows)}


def plot(rows: list[dict], front: set[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        on = r["config"] in front
        ax.scatter(r["tok_s_b1"], 100 * r["accuracy"], marker="o" if on else "x", color="C3" if on else "C0")
        ax.annotate(r["config"], (r["tok_s_b1"], 100 * r["accuracy"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    line = sorted((r for r in rows if r["config"] in front), key=lambda r: r["tok_s_b1"])
    ax.plot([r["tok_s_b1"] for r in line], [100 * r["accuracy"] for r in line], color="C3", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s at batch 1 (canvas tokens)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/addition-small")
    ap.add_argument("--examples", type=int, default=500, help="test examples scored per config")
    ap.add_argument("--b1-examples", type=int, default=48, help="of them, timed one at a time")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--configs", default="", help="comma-separated names to run (default all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/accuracy.json")
    args = ap.parse_args()

    rt = load_runtime(args.model, args.device, args.dtype, threads=args.threads)
    task = task_of_checkpoint(rt.loaded.config)
    if task is None:
        raise SystemExit(f"--model {args.model}: not trained on a task (its config.json has no data=task)")
    examples = task.examples("test", args.examples)
    base = baseline_params(task, model_block=rt.loaded.model_config.denoise_block)
    wanted = {c.strip() for c in args.configs.split(",") if c.strip()}
    configs = [(n, o) for n, o in CONFIGS if not wanted or n in wanted]
    tok = rt.loaded.tokenizer
    with inference(rt):
        score_task(rt.loaded.model, tok, task, examples[:4], base, batch_size=4)  # warm-up
        rows = []
        for name, overrides in configs:
            params, stop = params_for(base, overrides), not overrides.get("whole_canvas")
            full: TaskScore = score_task(rt.loaded.model, tok, task, examples, params, batch_size=args.batch,
                                         stop_at_eos=stop)
            b1_seconds, b1_tokens = 0.0, 0
            for ex in examples[:args.b1_examples]:
                one = score_task(rt.loaded.model, tok, task, [ex], params, batch_size=1, stop_at_eos=stop)
                b1_seconds += one.seconds
                b1_tokens += one.canvas_tokens
            row = {"config": name, "params": {k: v for k, v in params.model_dump().items() if v is not None},
                   "stop_at_eos": stop,
                   "accuracy": full.accuracy, "tok_s_b1": b1_tokens / b1_seconds,
                   "tok_s_b16": full.canvas_tokens / full.seconds, "nfe_per_token": full.nfe_per_token,
                   "seconds_per_sample_b1": b1_seconds / args.b1_examples,
                   "answer_tokens_per_sample": full.answer_tokens / full.examples,
                   "answer_tok_s_b16": full.answer_tokens / full.seconds}
            rows.append(row)
            print(f"{name:36s} acc {100 * row['accuracy']:5.1f}%  b1 {row['tok_s_b1']:8.1f} tok/s  "
                  f"b{args.batch} {row['tok_s_b16']:8.1f} tok/s  TPF {row['nfe_per_token']:.3f}", flush=True)
    base_row = next((r for r in rows if r["config"] == CONFIGS[0][0]), None)
    summary = None
    if base_row is not None:
        for r in rows:
            r["speedup_b1"] = r["tok_s_b1"] / base_row["tok_s_b1"]
            r["speedup_b16"] = r["tok_s_b16"] / base_row["tok_s_b16"]
        within = [r for r in rows if r["accuracy"] >= base_row["accuracy"] - 0.01]
        best = max(within, key=lambda r: r["tok_s_b1"])
        summary = {"best_within_1_point": best["config"], "speedup_b1": best["speedup_b1"],
                   "nfe_per_token": best["nfe_per_token"], "accuracy": best["accuracy"],
                   "baseline_accuracy": base_row["accuracy"],
                   "target_8x_b1": best["speedup_b1"] >= 8.0, "target_tpf_0.3": best["nfe_per_token"] <= 0.3}
        print(json.dumps(summary))
    front = pareto(rows)
    for r in rows:
        r["pareto"] = r["config"] in front
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(rt.device), "precision": rt.dtype_name, "model": args.model,
                               "attention": rt.loaded.model_config.attention, "task": task.name,
                               "max_tokens": task.max_tokens, "examples": len(examples),
                               "b1_examples": args.b1_examples, "batch": args.batch, "summary": summary,
                               "rows": rows}, indent=2) + "\n")
    plot(rows, front, out.with_suffix(".png"),
         f"{args.model}: {task.name} test ({len(examples)} examples, canvas {task.max_tokens}), "
         f"{machine(rt.device)}, {rt.dtype_name}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
