"""Sampler benchmark: speed and quality together, on the default model and its autoregressive judge.

For each configuration: tokens/s at batch 1 and batch 16, NFE, generative perplexity of the generated
tokens under the judge (conditioned on the prompt), and unigram entropy of the samples, at temperature
0 and 1 (fixed seeds). Prompts are cut from the held-out plays. Prints a table, writes JSON and a PNG.

    python -m bench.sampler --checkpoint models/shakespeare-small --judge models/shakespeare-small-judge
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from server.runtime import Runtime, inference, load_runtime
from trainer.data import load_corpus
from tzd.checkpoint import Loaded, load_checkpoint
from tzd.sampling import SamplingParams, generate

# name -> SamplingParams overrides; "steps" is a fraction of max_tokens (1 = one token per step, LLaDA)
CONFIGS: dict[str, dict] = {
    "llada": {"steps": 1.0},
    "steps/2": {"steps": 0.5},
    "steps/4": {"steps": 0.25},
    "threshold=0.9": {"threshold": 0.9},
    "threshold=0.7": {"threshold": 0.7},
    "threshold=0.5": {"threshold": 0.5},
    "threshold=0.9+prefix": {"threshold": 0.9, "cache": "prefix"},
    "threshold=0.9+dual": {"threshold": 0.9, "cache": "dual"},
    # beyond the list: the lower thresholds with the dual cache
    "threshold=0.7+dual": {"threshold": 0.7, "cache": "dual"},
    "threshold=0.5+dual": {"threshold": 0.5, "cache": "dual"},
}


def held_out_prompts(loaded: Loaded, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens spread evenly over the held-out works (the default data split)."""
    from omegaconf import OmegaConf

    data = OmegaConf.create(loaded.config["training"]["config"]["data"])
    text = "\n".join(load_corpus(data).val)
    ids = loaded.tokenizer.encode(text)
    starts = torch.linspace(0, len(ids) - length - 1, n).long().tolist()
    return [ids[s:s + length] for s in starts]


@torch.inference_mode()
def judge_nll(judge: Loaded, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Mean NLL (nats/token) of the generated tokens under the causal judge, given the prompt."""
    total, count = 0.0, 0
    for p, o in zip(prompts, outputs, strict=True):
        if not o:
            continue
        ids = torch.tensor([p + o], device=judge.device)
        logp = judge.model(ids)[0, :-1].float().log_softmax(-1)
        tgt = ids[0, 1:]
        nll = -logp.gather(-1, tgt[:, None]).squeeze(-1)[len(p) - 1:]
        total += float(nll.sum())
        count += len(o)
    return total / max(count, 1)


def unigram_entropy(outputs: list[list[int]]) -> float:
    """Entropy (nats) of the token distribution pooled over all samples: low means repetition."""
    counts = Counter(t for o in outputs for t in o)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def block_start_confidence(rt: Runtime, prompts: list[list[int]], outputs: list[list[int]], block: int) -> float:
    """Median top-1 probability over the masked positions of a block at its first step."""
    probs = []
    mask = rt.loaded.mask_id
    for p, o in zip(prompts, outputs, strict=True):
        for b in range(0, len(o), block):
            ids = torch.tensor([p + o[:b] + [mask] * (len(o) - b)], device=rt.device)
            with inference(rt):
                logits = rt.loaded.model(ids)[0, len(p) + b:len(p) + b + block].float()
                logits[:, mask] = float("-inf")
                probs += logits.softmax(-1).max(-1).values.tolist()
    return statistics.median(probs)


def run(rt: Runtime, prompts: list[list[int]], params: SamplingParams, batch: int
        ) -> tuple[list[list[int]], float, float]:
    """(outputs, seconds, mean NFE) for `prompts` in batches of `batch`."""
    loaded = rt.loaded
    if rt.device.type == "cuda":  # an untimed pass first: Triton compiles and autotunes per shape
        with inference(rt):
            generate(loaded.model, prompts[:batch], [params] * len(prompts[:batch]), loaded.mask_id)
    outs, nfes, t0 = [], [], time.perf_counter()
    with inference(rt):
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            seeded = [params.model_copy(update={"seed": (params.seed or 0) + i + j}) for j in range(len(chunk))]
            res = generate(loaded.model, chunk, seeded, loaded.mask_id)
            outs += [r.tokens for r in res]
            nfes += [r.nfe for r in res]
    dt = time.perf_counter() - t0  # generate() returns host lists, so the device is done by now
    return outs, dt, statistics.mean(nfes)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="models/shakespeare-small")
    ap.add_argument("--judge", default="models/shakespeare-small-judge")
    ap.add_argument("--prompts", type=int, default=32, help="prompts for quality (run at batch 16)")
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts timed at batch 1")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from the list")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the model's precision, as the server's --dtype (auto: what `python -m server` picks on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (the CPU is the default: the issue's figures)")
    ap.add_argument("--out", default="bench/results/sampler.json")
    ap.add_argument("--png", default="bench/results/sampler.png")
    args = ap.parse_args()

    rt = load_runtime(args.checkpoint, args.device, args.dtype)  # the server's precision policy
    loaded, device = rt.loaded, rt.device
    judge = load_checkpoint(args.judge, device=device)  # fp32: the quality measure stays exact
    prompts = held_out_prompts(loaded, args.prompts, args.prompt_len)
    rows, outputs, greedy = [], {}, {}
    for name in args.configs.split(","):
        extra = dict(CONFIGS[name])
        if "steps" in extra:
            extra["steps"] = int(extra["steps"] * args.max_tokens)
        row: dict = {"config": name, **extra}
        for temperature in (0.0, 1.0):
            params = SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length,
                                    temperature=temperature, seed=1234, **extra)
            outs, secs, nfe = run(rt, prompts, params, 16)
            tag = f"t{temperature:g}"
            outputs[name, temperature] = outs
            uncached = name.split("+")[0]
            if "+" in name and (uncached, temperature) in outputs:  # the cache is approximate: how close?
                ref = outputs[uncached, temperature]
                same = sum(a == b for o, r in zip(outs, ref, strict=True) for a, b in zip(o, r, strict=False))
                row[f"{tag}_token_agreement_vs_{uncached}"] = same / max(1, sum(len(r) for r in ref))
            row[f"{tag}_tokens_per_s_b16"] = sum(len(o) for o in outs) / secs
            row[f"{tag}_nfe"] = nfe
            row[f"{tag}_gen_ppl"] = math.exp(judge_nll(judge, prompts, outs))
            row[f"{tag}_entropy"] = unigram_entropy(outs)
            if temperature == 0.0:
                greedy[name] = params
                if name.startswith("llada"):
                    row["median_block_start_confidence"] = block_start_confidence(
                        rt, prompts[:8], outs[:8], args.block_length)
        rows.append(row)
        print(json.dumps(row))

    # batch-1 speed, round-robin over the configs one prompt at a time: a background load that drifts
    # over minutes (this host's did) then hits every config alike instead of whichever ran during it
    tokens, seconds = dict.fromkeys(greedy, 0), dict.fromkeys(greedy, 0.0)
    for i in range(args.batch1_prompts):
        for name, params in greedy.items():
            outs, secs, _ = run(rt, prompts[i:i + 1], params.model_copy(update={"seed": params.seed + i}), 1)
            tokens[name] += len(outs[0])
            seconds[name] += secs
    for row in rows:
        row["t0_tokens_per_s_b1"] = tokens[row["config"]] / seconds[row["config"]]

    base = rows[0]
    print(f"\n{'config':<22}{'tok/s b1':>9}{'tok/s b16':>10}{'NFE':>6}{'gPPL t0':>9}{'H t0':>6}"
          f"{'gPPL t1':>9}{'H t1':>6}{'speedup':>8}")
    for r in rows:
        r["speedup_b1"] = r["t0_tokens_per_s_b1"] / base["t0_tokens_per_s_b1"]
        print(f"{r['config']:<22}{r['t0_tokens_per_s_b1']:>9.1f}{r['t0_tokens_per_s_b16']:>10.1f}"
              f"{r['t0_nfe']:>6.0f}{r['t0_gen_ppl']:>9.1f}{r['t0_entropy']:>6.2f}{r['t1_gen_ppl']:>9.1f}"
              f"{r['t1_entropy']:>6.2f}{r['speedup_b1']:>7.2f}x")
    ok = [r for r in rows if r["t0_gen_ppl"] <= 1.10 * base["t0_gen_ppl"]
          and r["t0_entropy"] >= 0.95 * base["t0_entropy"]]
    best = max(ok, key=lambda r: r["t0_tokens_per_s_b1"])
    print(f"\nbest within 10% of the baseline's generative perplexity (t=0, entropy >= 0.95x): {best['config']} "
          f"at {best['speedup_b1']:.2f}x the baseline's tokens/s (batch 1)")
    print(f"baseline median top-1 probability at a block's first step: {base['median_block_start_confidence']:.3f}")
    print(f"batch 16 over batch 1 (baseline): {base['t0_tokens_per_s_b16'] / base['t0_tokens_per_s_b1']:.2f}x")
    result = {"checkpoint": args.checkpoint, "judge": args.judge, "prompts": args.prompts,
              "batch1_prompts": args.batch1_prompts, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "block_length": args.block_length,
              "dtype": rt.dtype_name,
              "device": str(device), "machine": machine(device),
              "rows": rows, "best": best["config"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.png, device)


def machine(device: torch.device) -> str:
    host = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    return f"{torch.cuda.get_device_name(device)}; {host}" if device.type == "cuda" else host


def plot(rows: list[dict], path: str, device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>Px*"
    for i, r in enumerate(rows):  # a legend, not annotations: the slow configs sit on top of each other
        ax.scatter(r["t0_tokens_per_s_b1"], r["t0_gen_ppl"], marker=markers[i % len(markers)], s=40,
                   label=f"{r['config']} (NFE {r['t0_nfe']:.0f})")
    ax.axhline(1.10 * rows[0]["t0_gen_ppl"], color="grey", ls="--", lw=1, label=f"1.10x {rows[0]['config']}")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel(f"tokens/s (batch 1, {device.type.upper()})")
    ax.set_ylabel("generative perplexity under the judge (t=0)")
    ax.set_title("TZD sampler: speed against quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
