#!/usr/bin/env bash
# GPU check, in one go, installing nothing (Python packages the machine lacks must already be on
# PYTHONPATH), most informative first:
#   1. a short generation with the default model on both kernel paths (TZD_KERNELS=torch|triton),
#      plus the logits of one forward compared across the paths
#   2. the sampler benchmark on CUDA (bench/sampler.py --device cuda): speed and quality per config,
#      then an LLaDA-8B-shaped model's speed and MFU, and LLaDA2-mini's shape (bench/family_speed.py)
#   3. the kernel tests on CUDA, compiled (not interpreted): tests/test_kernels*.py, one fixed tile config
#      (TZD_AUTOTUNE=0; autotuned, they took about 130 s on an H200, most of it compiling and autotuning),
#      the one-sync test, CUDA graphs' tokens against eager, the paged KV store, and batch invariance on CUDA: the attention kernels' rows alone vs batched, and
#      the server at concurrency 16 vs alone (--deterministic on), the quantized layers (tests/test_quant_cuda.py)
#   4. the serving benchmark against `python -m server --device cuda` (bench/serve.py); then with the dual
#      cache, eager and with --cuda-graphs on
#   5. quantized weights on CUDA (python -m bench.quant --device cuda, short settings)
#   6. the kernel benchmark: bench/kernels.py (table + JSON)
# Usage: bench/gpu_check.sh OUT_DIR [CHECKPOINT_DIR]   (default checkpoint: models/shakespeare-small)
# Everything lands in OUT_DIR; summary.txt lists each step's exit status. Each step gets a share of
# an overall deadline (GPU_CHECK_DEADLINE, default 470 s) so the whole check ends within 8 minutes.
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUT_DIR [CHECKPOINT_DIR]}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CKPT=${2:-$ROOT/models/shakespeare-small}
PY=${PYTHON:-python}
DEADLINE=${GPU_CHECK_DEADLINE:-470}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET TZD_KERNELS
: > "$OUT/summary.txt"

budget() {  # seconds left for a step: its cap, or what the deadline leaves
    local left=$((DEADLINE - SECONDS))
    ((left < $1)) && echo $((left > 10 ? left : 10)) || echo "$1"
}

step() {  # step NAME CAP_SECONDS COMMAND...: run with a timeout, log to OUT/NAME.txt, record the status
    local name=$1 cap; cap=$(budget "$2"); shift 2
    local t0=$SECONDS
    echo "== $name (timeout ${cap}s)"
    timeout --kill-after=5 "$cap" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc ${cap}s-cap $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

{
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    git -C "$ROOT" log -1 --oneline 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, triton, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check: needs CUDA and triton (torch.cuda.is_available() and import triton); see env.txt" \
        | tee -a "$OUT/summary.txt"
    exit 2
fi

step generate 75 "$PY" - "$OUT/generate.json" "$CKPT" <<'PY'
"""Generate with the default model on both kernel paths; compare one forward's logits across them."""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from tzd.models import build_model
from tzd.sampling import SamplingParams, generate
from tzd.tokenizer import SpecialIds

out, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
res = {"checkpoint": str(ckpt)}
if (ckpt / "config.json").is_file():
    from tzd.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, device="cuda", dtype=torch.float32)
    model32, tok, mask_id, eos = loaded.model, loaded.tokenizer, loaded.mask_id, loaded.special.eos
    prompts = [tok.encode(p) for p in ("ROMEO:\n", "First Citizen:\nWe are", "KING HENRY:\nNow", "JULIET:\nO")]
    res["weights"] = "checkpoint"
else:  # no checkpoint here: the default architecture with random weights still exercises the path
    spec = importlib.util.spec_from_file_location("bench_kernels", "bench/kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    model32 = build_model(bench.default_model_config()).cuda().eval().requires_grad_(False)
    tok, mask_id, eos = None, SpecialIds().mask, None
    prompts = torch.randint(8, 200, (4, 12)).tolist()
    res["weights"] = f"random (no checkpoint at {ckpt})"
print("weights:", res["weights"])

# One forward, both paths: fp32 should agree to ~1e-4; bf16 is judged against fp32.
n = min(8, *(len(p) for p in prompts))
ids = torch.tensor([p[:n] for p in prompts], device="cuda")
logits = {}
for dtype in (torch.float32, torch.bfloat16):
    model = model32.to(dtype)
    for mode in ("torch", "triton"):
        os.environ["TZD_KERNELS"] = mode
        with torch.inference_mode():
            logits[(str(dtype), mode)] = model(ids).float()
exact = logits[("torch.float32", "torch")]
res["logits_max_abs"] = exact.abs().max().item()
res["logits_fp32_triton_vs_torch"] = (logits[("torch.float32", "triton")] - exact).abs().max().item()
for mode in ("torch", "triton"):
    res[f"logits_bf16_{mode}_vs_fp32"] = (logits[("torch.bfloat16", mode)] - exact).abs().max().item()

model = model32.to(torch.bfloat16)
params = SamplingParams(max_tokens=64, steps=64, block_length=32, temperature=0.0, seed=0)
for mode in ("torch", "triton"):
    os.environ["TZD_KERNELS"] = mode
    with torch.inference_mode():
        generate(model, prompts, params, mask_id, eos_id=eos, tokenizer=tok)  # warm-up: compile, autotune
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        results = generate(model, prompts, params, mask_id, eos_id=eos, tokenizer=tok)
        torch.cuda.synchronize()
    res[mode] = {"seconds": time.perf_counter() - t0, "nfe": [r.nfe for r in results],
                 "tokens": [r.tokens for r in results], "text": [r.text for r in results]}
    print(f"{mode:>6}: {res[mode]['seconds']:.3f}s for {len(prompts)} prompts x {params.max_tokens} tokens")
    for text, tokens in zip(res[mode]["text"], res[mode]["tokens"]):
        print("   ", repr(text if text is not None else tokens)[:160])
pairs = [(a, b) for ta, tb in zip(res["torch"]["tokens"], res["triton"]["tokens"]) for a, b in zip(ta, tb)]
res["token_agreement_bf16"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
for key in ("logits_max_abs", "logits_fp32_triton_vs_torch", "logits_bf16_torch_vs_fp32",
            "logits_bf16_triton_vs_fp32", "token_agreement_bf16"):
    print(f"{key}: {res[key]:.4g}")
out.write_text(json.dumps(res, indent=1))
PY

SAMPLER_CONFIGS=llada,threshold=0.9,threshold=0.9+dual,threshold=0.9+prefix,steps/2,steps/4,threshold=0.7,threshold=0.5
step sampler 170 "$PY" -m bench.sampler --device cuda --checkpoint "$CKPT" --configs "$SAMPLER_CONFIGS" \
    --out "$OUT/sampler_gpu.json" --png "$OUT/sampler_gpu.png"

# an LLaDA-8B-shaped model (32 layers, random bf16 weights): tokens/s at batch 1 and 16, baseline and dual
# cache, and the MFU of the baseline's forward (about 16 GB of weights, 4 GB of KV store at batch 16)
step llada8b 150 "$PY" -m bench.family_speed --device cuda --out "$OUT/llada8b.json"
# LLaDA2.0-mini's shape (mixture of experts, block diffusion; 4 of its 20 layers, random bf16 weights): its
# rule's tokens/s at batch 1 and 16, the MoE layers' share of a forward, one MoE layer against a dense one
step llada2 60 "$PY" -m bench.family_speed --device cuda --family llada2 --layers 4 --prompt 64 --tokens 128 \
    --out "$OUT/llada2_mini.json"

# TZD_AUTOTUNE=0: the kernels run one fixed tile config (no compile-and-time search per test shape, which
# took most of this step); the autotuned kernels are checked against SDPA by the kernel benchmark below
step tests 220 env TZD_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_varlen.py tests/test_kernels_moe.py \
    tests/test_kernels_model.py tests/test_sampling_cuda.py tests/test_cuda_graphs.py tests/test_kv_pages.py \
    tests/test_invariance.py tests/test_server_invariance.py tests/test_quant_cuda.py -k "not on_cpu_default and not on_cpu_bf16_units" \
    --junitxml "$OUT/tests.xml"

step serve 100 "$PY" -m bench.serve --device cuda --checkpoint "$CKPT" --concurrency 1,4,16,32 --repeats 1 \
    --out "$OUT/serve_gpu.json" --png "$OUT/serve_gpu.png"

# the dual cache through the server, eager and with --cuda-graphs on (the captured cached step)
step serve_dual 60 "$PY" -m bench.serve --device cuda --checkpoint "$CKPT" --concurrency 1,16 --repeats 1 \
    --cache dual --no-offline --out "$OUT/serve_gpu_dual.json" --png "$OUT/serve_gpu_dual.png"
step serve_graphs 60 "$PY" -m bench.serve --device cuda --checkpoint "$CKPT" --concurrency 1,16 --repeats 1 \
    --cache dual --no-offline --server-args "--cuda-graphs on" --out "$OUT/serve_gpu_graphs.json" \
    --png "$OUT/serve_gpu_graphs.png"

# quantized weights (int8, int4, fp8 on sm_89+): bytes, held-out NELBO and tokens/s against bf16, short settings
step quant 60 "$PY" -m bench.quant --device cuda --checkpoint "$CKPT" --eval-batches 4 --tokens 32 \
    --llada-layers 1 --llada-tokens 16 --out "$OUT/quant_gpu.json"

QUICK=()
((DEADLINE - SECONDS < 200)) && QUICK=(--quick)  # fewer shapes when the steps before ran long
step bench 90 "$PY" bench/kernels.py --out "$OUT/kernels.json" ${QUICK[@]+"${QUICK[@]}"}

echo "== done in ${SECONDS}s; results in $OUT" | tee -a "$OUT/summary.txt"
! grep -q "rc=[1-9]" "$OUT/summary.txt"
