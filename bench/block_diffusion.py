"""Block diffusion against the bidirectional default: speed at batch 1, quality, cache agreement.

The baseline is LLaDA's sampler on the bidirectional default model (cache none, one token per step);
the block-causal model (same widths and data) runs its exact cache with and without threshold
decoding. Per config: tokens/s at batch 1 (round-robin over configs, one prompt at a time), NFE per
generated token, generative perplexity under the judge and unigram entropy at temperature 0 and 1
(32 held-out prompts at batch 16); for the block-causal configs the token agreement of the exact cache
with the uncached block-causal sampler (the whole canvas through the model every step), and the
model's median top-1 probability at a block's first step.

    python -m bench.block_diffusion --bd models/shakespeare-small-bd --baseline models/shakespeare-small
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from bench.sampler import held_out_prompts, judge_nll, machine, run, unigram_entropy
from server.runtime import Runtime, inference, load_runtime
from tzd.checkpoint import load_checkpoint
from tzd.models import ForwardContext
from tzd.models.blocks import block_ids
from tzd.sampling import SamplingParams

# (model, name, overrides); steps as a fraction of max_tokens
CONFIGS: list[tuple[str, str, dict]] = [
    ("baseline", "bidirectional llada", {"steps": 1.0}),
    ("baseline", "bidirectional threshold=0.5+dual", {"threshold": 0.5, "cache": "dual"}),
    ("budget", "bidirectional llada, the block model's budget", {"steps": 1.0}),
    ("bd", "block-causal llada (uncached)", {"steps": 1.0}),
    ("bd", "block-causal llada+exact cache", {"steps": 1.0, "cache": "dual"}),
    ("bd", "block-causal steps/2+exact", {"steps": 0.5, "cache": "dual"}),
    ("bd", "block-causal steps/4+exact", {"steps": 0.25, "cache": "dual"}),
    ("bd", "block-causal threshold=0.9+exact", {"threshold": 0.9, "cache": "dual"}),
    ("bd", "block-causal threshold=0.7+exact", {"threshold": 0.7, "cache": "dual"}),
    ("bd", "block-causal threshold=0.5 (uncached)", {"threshold": 0.5}),
    ("bd", "block-causal threshold=0.5+exact", {"threshold": 0.5, "cache": "dual"}),
]


@torch.inference_mode()
def block_start_confidence(rt: Runtime, prompts: list[list[int]], outputs: list[list[int]], block: int) -> float:
    """Median top-1 probability over a block's masked positions at its first step (the served layout)."""
    cfg, mask, probs = rt.loaded.model_config, rt.loaded.mask_id, []
    for p, o in zip(prompts, outputs, strict=True):
        for b in range(0, len(o), block):
            ids = torch.tensor([p + o[:b] + [mask] * (len(o) - b)], device=rt.device)
            ctx = ForwardContext(block_ids=block_ids(ids.shape[1], len(p), block, rt.device, cfg.block_align)
                                 if cfg.block_causal else None)
            with inference(rt):
                logits = rt.loaded.model(ids, ctx)[0, len(p) + b:len(p) + b + block].float()
            logits[:, mask] = float("-inf")
            probs += logits.softmax(-1).max(-1).values.tolist()
    return statistics.median(probs)


@torch.inference_mode()
def held_out_nelbo(rt: Runtime, batches: int = 4, batch_size: int = 24, draws: int = 1) -> dict[str, float]:
    """The validation NELBO (the block-diffusion bound for a block-causal model) with the trainer's fixed
    seeds and windows (4 batches of 24 windows spread over the held-out plays, one masking each: a quarter
    of the trainer's own 16 x 2, to keep the block model's two-stream forwards within minutes here):
    nats per token and per character."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    from trainer.data import TokenWindows, encode_documents, load_corpus  # noqa: PLC0415
    from tzd.diffusion import evaluate  # noqa: PLC0415

    loaded, cfg = rt.loaded, rt.loaded.model_config
    corpus = load_corpus(OmegaConf.create(loaded.config["training"]["config"]["data"]))
    windows = TokenWindows(encode_documents(loaded.tokenizer, corpus.val), cfg.context_len, "validation")
    chars = sum(len(d) for d in corpus.val) + len(corpus.val)
    with inference(rt):
        res = evaluate(loaded.model, windows.grid(batch_size, batches), loaded.mask_id, cfg, draws=draws)
    return {"batches": batches, "batch_size": batch_size, "draws": draws, "val_nats_per_token": res.nats_per_token,
            "val_nats_per_char": res.nats_per_token / (chars / len(windows.tokens))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bd", default="models/shakespeare-small-bd")
    ap.add_argument("--baseline", default="models/shakespeare-small")
    ap.add_argument("--judge", default="models/shakespeare-small-judge")
    ap.add_argument("--budget", default=None, help="the bidirectional preset trained on the block model's token "
                                                    "budget (its row is left out without it)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch1-prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    ap.add_argument("--skip-nelbo", action="store_true", help="leave out the held-out NELBO (minutes on a CPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/block_diffusion.json")
    args = ap.parse_args()

    rts = {"baseline": load_runtime(args.baseline, args.device, args.dtype),
           "bd": load_runtime(args.bd, args.device, args.dtype)}
    if args.budget:
        rts["budget"] = load_runtime(args.budget, args.device, args.dtype)
    nelbo = {} if args.skip_nelbo else {
        name: {"checkpoint": str(rt.loaded.path),
               "tokens_seen": rt.loaded.config.get("training", {}).get("tokens_seen"),
               **held_out_nelbo(rt)} for name, rt in rts.items()}
    print(json.dumps(nelbo), flush=True)
    chosen = set(args.configs.split(",")) if args.configs else None
    judge = load_checkpoint(args.judge, device=rts["bd"].device)
    prompts = held_out_prompts(rts["baseline"].loaded, args.prompts, args.prompt_len)  # same split, same tokenizer
    rows, outputs, greedy = [], {}, {}
    for model, name, extra in CONFIGS:
        if model not in rts or (chosen is not None and name not in chosen):
            continue
        extra = dict(extra)
        if "steps" in extra:
            extra["steps"] = int(extra["steps"] * args.max_tokens)
        row: dict = {"config": name, "model": model, **extra}
        for temperature in (0.0, 1.0):
            params = SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length,
                                    temperature=temperature, seed=1234, **extra)
            outs, _, nfe = run(rts[model], prompts, params, 16)
            outputs[name, temperature] = outs
            tag = f"t{temperature:g}"
            row[f"{tag}_nfe_per_token"] = nfe / args.max_tokens
            row[f"{tag}_gen_ppl"] = math.exp(judge_nll(judge, prompts, outs))
            row[f"{tag}_entropy"] = unigram_entropy(outs)
            uncached = name.replace("+exact cache", " (uncached)").replace("+exact", " (uncached)")
            if model == "bd" and "exact" in name and (uncached, temperature) in outputs:
                ref = outputs[uncached, temperature]
                same = sum(a == b for o, r in zip(outs, ref, strict=True) for a, b in zip(o, r, strict=False))
                row[f"{tag}_token_agreement_vs_uncached"] = same / max(1, sum(len(r) for r in ref))
            if temperature == 0.0:
                greedy[name] = (model, params)
        if "llada" in name and "exact" not in name:
            row["median_block_start_confidence"] = block_start_confidence(
                rts[model], prompts[:8], outputs[name, 0.0][:8], args.block_length)
        rows.append(row)
        print(json.dumps(row), flush=True)

    tokens, seconds = dict.fromkeys(greedy, 0), dict.fromkeys(greedy, 0.0)
    for i in range(args.batch1_prompts):  # round-robin: drifting background load hits every config alike
        for name, (model, params) in greedy.items():
            outs, secs, _ = run(rts[model], prompts[i:i + 1], params.model_copy(update={"seed": params.seed + i}), 1)
            tokens[name] += len(outs[0])
            seconds[name] += secs
    base = rows[0]
    for r in rows:
        r["t0_tokens_per_s_b1"] = tokens[r["config"]] / seconds[r["config"]]
    for r in rows:
        r["speedup_vs_baseline_b1"] = r["t0_tokens_per_s_b1"] / base["t0_tokens_per_s_b1"]
        r["within_quality_bounds"] = all(r[f"t{t}_gen_ppl"] <= 1.10 * base[f"t{t}_gen_ppl"]
                                         and r[f"t{t}_entropy"] >= 0.95 * base[f"t{t}_entropy"] for t in ("0", "1"))
    print(f"\n{'config':<40}{'tok/s b1':>9}{'x base':>8}{'NFE/tok':>8}{'gPPL t0':>9}{'H t0':>6}{'gPPL t1':>9}"
          f"{'H t1':>6}{'agree':>7}")
    for r in rows:
        agree = r.get("t0_token_agreement_vs_uncached")
        print(f"{r['config']:<40}{r['t0_tokens_per_s_b1']:>9.1f}{r['speedup_vs_baseline_b1']:>7.2f}x"
              f"{r['t0_nfe_per_token']:>8.3f}{r['t0_gen_ppl']:>9.1f}{r['t0_entropy']:>6.2f}{r['t1_gen_ppl']:>9.1f}"
              f"{r['t1_entropy']:>6.2f}{'' if agree is None else f'{agree:7.3f}'}")
    result = {"bd": args.bd, "baseline": args.baseline, "judge": args.judge, "prompts": args.prompts,
              "batch1_prompts": args.batch1_prompts, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "block_length": args.block_length, "dtype": rts["bd"].dtype_name, "device": str(rts["bd"].device),
              "machine": machine(rts["bd"].device), "held_out": nelbo, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
