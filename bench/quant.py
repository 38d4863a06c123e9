"""Quantized weights: bytes held, held-out NELBO and tokens/s of int8 / int4 (and fp8 on a capable GPU) against bf16.

Two models. The default one (models/shakespeare-small): weight bytes of each variant loaded in bf16, the
NELBO bound on held-out Shakespeare (the trainer's validation works, its window grid, tzd.diffusion.evaluate
with one fixed seed, so every variant sees the same masks; computed in fp32 so that the weights are the only
difference) and tokens/s at batch 1 and 16 in the server's precision. The synthetic LLaDA-8B-widths
checkpoint of bench.load (d_model 4096, MLP 12288, vocab 126,464; --llada-layers of them, random weights,
so no NELBO): weight bytes and peak RSS of loading each variant, and tokens/s. Every variant loads in a
fresh process (peak RSS is per process). Timings need the machine to itself.

    python -m bench.quant                                   # writes bench/results/quant.json
    python -m bench.quant --device cuda --out bench/results/gpu/quant.json
    python -m bench.quant --llada-layers 1 --eval-batches 1 --tokens 8 --batches 1 --llada-tokens 0   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.load import write_checkpoint
from tzd.checkpoint import load_checkpoint, resolve_device
from tzd.quant import QuantConfig, QuantizationError, check_device

VARIANTS: dict[str, QuantConfig | None] = {
    "bf16": None, "int8": QuantConfig("int8"), "int8+head": QuantConfig("int8", head=True),
    "int4-g64": QuantConfig("int4", 64), "int4-g64+head": QuantConfig("int4", 64, head=True),
    "int4-g128+head": QuantConfig("int4", 128, head=True),
    "fp8": QuantConfig("fp8"), "fp8+head": QuantConfig("fp8", head=True),  # CUDA sm_89+ only
}
PROMPT_LEN, BLOCK = 16, 32


def variants_for(device: torch.device) -> dict[str, QuantConfig | None]:
    out = {}
    for name, q in VARIANTS.items():
        try:
            if q is not None:
                check_device(q, device)
        except QuantizationError:
            continue
        out[name] = q
    return out


def held_out_batches(checkpoint: Path, batch_size: int, batches: int) -> list[torch.Tensor]:
    """The trainer's validation windows of the held-out works the checkpoint names (its config.json)."""
    from omegaconf import OmegaConf

    from trainer.data import TokenWindows, encode_documents, load_corpus

    config = json.loads((checkpoint / "config.json").read_text())
    data = config["training"]["config"]["data"]
    loaded = load_checkpoint(checkpoint, device="cpu")
    corpus = load_corpus(OmegaConf.create(data))
    windows = TokenWindows(encode_documents(loaded.tokenizer, corpus.val), loaded.model_config.context_len, "val")
    return windows.grid(batch_size, batches)


def nelbo(checkpoint: Path, quant: QuantConfig | None, batches: list[torch.Tensor], draws: int,
          device: torch.device) -> float:
    """tzd.diffusion.evaluate's bound (nats/token) in fp32 activations, seed fixed: the same masks for all."""
    from tzd.diffusion import evaluate

    loaded = load_checkpoint(checkpoint, device=device, dtype=torch.float32, quantization=quant)
    with torch.inference_mode():
        return evaluate(loaded.model, [b.to(device) for b in batches], loaded.mask_id, loaded.model_config,
                        seed=1234, draws=draws).nats_per_token


# One variant in a fresh process: bytes and peak RSS of load_checkpoint in bf16 on the device, then
# (after freeing it) tokens/s through the server's runtime (its precision choice) at each batch size.
CHILD = r"""
import json, sys, time, torch
from server.runtime import inference, load_runtime
from tzd.checkpoint import load_checkpoint
from tzd.quant import QuantConfig, weight_bytes
from tzd.sampling import SamplingParams, generate
path, device, q = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tokens, batches, prompt_len, block = int(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
quant = QuantConfig(**q) if q else None
t0 = time.perf_counter()
m = load_checkpoint(path, device=device, dtype=torch.bfloat16, quantization=quant)
out = {"load_s": round(time.perf_counter() - t0, 2), "weight_bytes": weight_bytes(m.model)}
if device.startswith("cuda"):
    out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
out["peak_rss_mb"] = round(int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) / 1024, 1)
del m
if tokens:
    rt = load_runtime(path, device=device, quantization=quant)
    out["runtime_dtype"] = rt.dtype_name
    vocab, mask = rt.loaded.model_config.vocab_size, rt.loaded.mask_id
    params = SamplingParams(max_tokens=tokens, steps=tokens, block_length=min(block, tokens))
    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
    for b in batches:
        g = torch.Generator().manual_seed(b)
        prompts = [[int(t) for t in torch.randint(0, vocab, (prompt_len,), generator=g) if int(t) != mask]
                   for _ in range(b)]
        with inference(rt):
            generate(rt.loaded.model, prompts, params, mask)  # untimed: first-call costs per shape
            sync(); t0 = time.perf_counter()
            generate(rt.loaded.model, prompts, params, mask)
            sync()
        out[f"tokens_per_s_batch{b}"] = round(b * tokens / (time.perf_counter() - t0), 2)
print(json.dumps(out))
"""


def measure(path: Path, device: str, quant: QuantConfig | None, tokens: int, batches: list[int]) -> dict[str, Any]:
    args = [str(path), device, json.dumps(asdict(quant) if quant else None), str(tokens), json.dumps(batches),
            str(PROMPT_LEN), str(BLOCK)]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{quant.name if quant else 'bf16'} on {path}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def against_bf16(rows: dict[str, dict[str, Any]]) -> None:
    """Add each variant's ratios to bf16: bytes, tokens/s, NELBO (relative change)."""
    base = rows["bf16"]
    for row in rows.values():
        row["bytes_vs_bf16"] = round(row["weight_bytes"] / base["weight_bytes"], 4)
        for key in [k for k in row if k.startswith("tokens_per_s_")]:
            row[key.replace("tokens_per_s", "speed_vs_bf16")] = round(row[key] / base[key], 3)
        if "nelbo" in row:
            row["nelbo_change"] = round(row["nelbo"] / base["nelbo"] - 1, 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("models/shakespeare-small"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-batches", type=int, default=16, help="held-out windows / eval-batch-size (the trainer's)")
    ap.add_argument("--eval-batch-size", type=int, default=24)
    ap.add_argument("--draws", type=int, default=2, help="maskings per batch (the trainer's eval_draws)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request (0: no timing)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--llada-layers", type=int, default=2, help="layers of the synthetic LLaDA-8B-widths model "
                                                                "(0: leave it out)")
    ap.add_argument("--llada-dir", type=Path, default=Path("/tmp/tzd-llada-quant"))
    ap.add_argument("--llada-tokens", type=int, default=32, help="tokens per request on it (0: no timing)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--variants", default="", help="comma-separated variants (bf16 among them; default: all the "
                                                    "device takes)")
    ap.add_argument("--skip-default", action="store_true", help="the LLaDA-widths checkpoint only")
    ap.add_argument("--llada-batches", default="", help="batch sizes on it (default: --batches)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quant.json"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    llada_batches = [int(b) for b in (args.llada_batches or args.batches).split(",")]
    variants = variants_for(device)
    if args.variants:
        asked = args.variants.split(",")
        unknown = [v for v in asked if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
        if "bf16" not in asked:
            raise SystemExit("--variants: bf16 must be among them (every ratio is against it)")
        variants = {k: v for k, v in variants.items() if k in asked}
    result: dict[str, Any] = {
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                    f"{platform.machine()} CPU, {torch.get_num_threads()} threads") + f", torch {torch.__version__}",
        "note": "weight_bytes: loaded in bf16 (scales in bf16); NELBO: fp32 activations, same masks for every "
                "variant; tokens/s: the server's precision on the device",
    }

    eval_batches = held_out_batches(args.checkpoint, args.eval_batch_size, args.eval_batches)
    default: dict[str, dict[str, Any]] = {}
    for name, quant in ({} if args.skip_default else variants).items():
        row = measure(args.checkpoint, str(device), quant, args.tokens, batches)
        row["nelbo"] = nelbo(args.checkpoint, quant, eval_batches, args.draws, device)
        default[name] = row
        print(f"{args.checkpoint.name:18s} {name:15s} {json.dumps(row)}", flush=True)
    if default:
        against_bf16(default)
    result["default_model"] = {"checkpoint": str(args.checkpoint),
                               "held_out_tokens": sum(b.numel() for b in eval_batches),
                               "draws": args.draws, "tokens": args.tokens, "variants": default}

    if args.llada_layers:
        if not (args.llada_dir / "config.json").is_file():
            t0 = time.perf_counter()
            write_checkpoint(args.llada_dir, args.llada_layers, 1000 << 20)
            print(f"wrote {args.llada_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
        size_mb = sum(f.stat().st_size for f in args.llada_dir.glob("*.safetensors")) / 2**20
        llada: dict[str, dict[str, Any]] = {}
        for name, quant in variants.items():
            llada[name] = measure(args.llada_dir, str(device), quant, args.llada_tokens, llada_batches)
            print(f"llada-8b-widths    {name:15s} {json.dumps(llada[name])}", flush=True)
        against_bf16(llada)
        result["llada_8b_widths"] = {"layers": args.llada_layers, "checkpoint_mb": round(size_mb, 1),
                                     "tokens": args.llada_tokens, "batches": llada_batches, "variants": llada}
        if not args.keep:
            import shutil

            shutil.rmtree(args.llada_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
