"""Peak memory of one sampler step at a public family's vocabulary (V = 126,464), on the CPU.

16 requests with 32 masked positions each (one block of 32) in one DenoiseBatch over a one-layer
model of LLaDA-8B's vocabulary at a small width, so that the step's [B,P,V] tensors dominate. The
peak is the process's VmHWM during the step over its RSS before it (Linux resets VmHWM through
/proc/self/clear_refs). Each case runs in a fresh process; the "before" rows reproduce the sampler
before this change: Gumbel noise as one float64 [B,P,V] tensor (and its int64 keys), top-k/top-p over
every row at once.

    python -m bench.step_memory                   # bench/results/step_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

VOCAB, BATCH, BLOCK = 126_464, 16, 32

CASES = {
    "greedy": {"temperature": 0.0},
    "temperature 1": {"temperature": 1.0},
    "temperature 1, top_p 0.9": {"temperature": 1.0, "top_p": 0.9},
}


def _status(key: str) -> int:
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith(key)).split()[1]) * 1024


def one_case(params: dict, chunk: int | None) -> dict[str, float]:
    import torch

    from tzd.models import ModelConfig, build_model
    from tzd.sampling import DenoiseBatch, SamplingParams, plan, rules

    if chunk is not None:  # the sampler before: noise over the whole vocabulary, the filter over all rows at once
        rules.GUMBEL_CHUNK = chunk
        rules.FILTER_CHUNK = BATCH * BLOCK * VOCAB
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, context_len=64, n_layer=1, n_head=2, n_embd=64)
    model = build_model(cfg).eval()
    batch = DenoiseBatch(model, mask_id=VOCAB - 1, capacity=BATCH)
    p = SamplingParams(max_tokens=BLOCK, steps=BLOCK, block_length=BLOCK, seed=1, **params)
    for i in range(BATCH):
        batch.add([1, 2, 3, 4 + i], plan(p, 4, cfg.context_len))
    with torch.inference_mode():
        batch.step()  # warm: allocator pools and lazy init are not the step's own
        for i in range(BATCH):  # a fresh block again, so the measured step has every position open
            batch.slots[i].block_step, batch.slots[i].open = 0, None
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        batch.step()
        peak = _status("VmHWM")
    return {"step_peak_mb": round((peak - before) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/step_memory.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case is not None:
        print(json.dumps(one_case(CASES[args.case], args.chunk)))
        return
    rows = []
    for case in CASES:
        for label, chunk in (("chunked noise (now)", None), ("unchunked (before)", VOCAB)):
            if case == "greedy" and chunk is not None:
                continue  # greedy draws no noise
            cmd = [sys.executable, "-m", "bench.step_memory", "--case", case]
            if chunk is not None:
                cmd += ["--chunk", str(chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "2",
                                                                                       "PATH": "/usr/bin:/bin"})
            rows.append({"case": case, "sampler": label, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(f"{case:28s} {label:36s} {rows[-1]['step_peak_mb']:8.1f} MB")
    bpv = BATCH * BLOCK * VOCAB
    result = {"machine": f"{platform.machine()} CPU", "vocab": VOCAB, "batch": BATCH, "block": BLOCK,
              "one_BPV_tensor_mb": {"float32": round(4 * bpv / 2**20, 1), "float64": round(8 * bpv / 2**20, 1)},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
