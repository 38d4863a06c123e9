"""Loading a public-family checkpoint: time and peak memory of load_checkpoint against reading the files.

A synthetic checkpoint in LLaDA's layout with LLaDA-8B's widths (d_model 4096, 32 heads, MLP 12288,
vocab 126,464) and 4 layers (about 1.9B params, bf16, sharded) is written once; then, each in a
fresh process (peak RSS is per process): an empty process (python + torch + tzd imported), reading
every file's bytes, load_checkpoint(..., dtype=bfloat16) on the CPU, and the same plus one forward
(which pages in every weight: on the CPU the loaded tensors are backed by the mapped files).

    python -m bench.load                      # writes /tmp/tzd-llada-4l (reused), bench/results/load.json
    python -m bench.load --layers 2 --keep    # smaller; keep the checkpoint afterwards
    python -m bench.load --family llada2 --layers 2 --dir /tmp/tzd-llada2-2l --out bench/results/load_llada2.json
        # LLaDA2.0-mini's widths (a dense first layer, then 256 experts of 512 + a shared one): ~1.5B params,
        # the stacked experts read one tensor per expert
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from tzd.hf import FAMILIES
from tzd.hf.families import STACKED, part_sizes
from tzd.models import ModelConfig, build_model

SPECIAL = {"llada": (126336, 126081), "llada2": (156895, 156892)}  # (mask, eos) of each family


def llada_8b_widths(layers: int) -> ModelConfig:
    return ModelConfig(backend="smdm", vocab_size=126464, context_len=4096, n_layer=layers, n_head=32, n_kv_head=32,
                       n_embd=4096, intermediate_size=12288, rope_base=500000.0, norm_eps=1e-5)


def llada2_mini_widths(layers: int) -> ModelConfig:
    return ModelConfig(backend="smdm", vocab_size=157184, context_len=4096, n_layer=layers, n_head=16, n_kv_head=4,
                       n_embd=2048, head_size=128, intermediate_size=5120, rope_base=600000.0, rotary_fraction=0.5,
                       norm_eps=1e-6, qk_norm=True, attention="block_causal", diffusion_block=32,
                       block_align="absolute", n_experts=256, n_experts_per_token=8, moe_intermediate_size=512,
                       n_shared_experts=1, first_k_dense_replace=1, router_score="sigmoid", router_bias=True,
                       n_group=8, topk_group=4, routed_scaling_factor=2.5)


WIDTHS = {"llada": llada_8b_widths, "llada2": llada2_mini_widths}
FAMILY_KEYS = {"llada": "llada", "llada2": "llada2_moe"}


def write_checkpoint(out: Path, layers: int, shard_bytes: int, family_name: str = "llada") -> int:
    """The synthetic directory, written tensor by tensor (never the whole model in memory); its size in bytes."""
    cfg = WIDTHS[family_name](layers)
    family = FAMILIES[FAMILY_KEYS[family_name]]
    MASK_ID, EOS_ID = SPECIAL[family_name]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors: list[tuple[str, tuple[int, ...]]] = []
    for key, names in family.tensor_sources(cfg).items():
        if key.endswith(STACKED):  # one tensor per expert
            tensors += [(n, tuple(shapes[key][1:])) for n in names]
            continue
        rows = part_sizes(key, cfg, len(names)) or [shapes[key][0]]
        tensors += [(n, (r, *shapes[key][1:])) for n, r in zip(names, rows, strict=True)]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        data = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shard}
        save_file(data, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in data.values())
        weight_map.update(dict.fromkeys(data, file))
        del data
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config = {**family.hf_config(cfg), "mask_token_id": MASK_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {f"<|t{i}|>": i for i in range(cfg.vocab_size)}  # every id named: no holes in the vocabulary
    vocab.update({"<unk>": 0, "<|endoftext|>": EOS_ID, "<|mdm_mask|>": MASK_ID})
    vocab = {t: i for t, i in vocab.items() if t not in (f"<|t{EOS_ID}|>", f"<|t{MASK_ID}|>", "<|t0|>")}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


CHILD = {
    "empty": "import torch, tzd.checkpoint, tzd.hf",
    "read_files": ("import torch, tzd.checkpoint, tzd.hf, pathlib, sys\n"
                   "for f in sorted(pathlib.Path(sys.argv[1]).glob('*.safetensors')):\n"
                   "    with open(f, 'rb', buffering=0) as fh:\n"
                   "        while fh.read(1 << 24): pass"),
    "load_checkpoint": ("import torch, tzd.checkpoint, tzd.hf, sys\n"
                        "m = tzd.checkpoint.load_checkpoint(sys.argv[1], device='cpu', dtype=torch.bfloat16)\n"
                        "assert next(m.model.parameters()).dtype == torch.bfloat16"),
    # safetensors maps the files and pages tensors in as they are first read: a forward touches every weight
    "load_and_forward": ("import torch, tzd.checkpoint, tzd.hf, sys\n"
                         "m = tzd.checkpoint.load_checkpoint(sys.argv[1], device='cpu', dtype=torch.bfloat16)\n"
                         "with torch.inference_mode(): m.model(torch.zeros(1, 8, dtype=torch.long))"),
}


def measure(kind: str, path: Path) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of one fresh process."""
    t0 = time.perf_counter()
    # VmHWM, not ru_maxrss: the latter survives exec, so a child would inherit its parent's peak
    code = CHILD[kind] + ("\nprint([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]"
                          ".split()[1])")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(int(out.stdout.split()[-1]) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(WIDTHS), default="llada")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tzd-llada-4l"))
    ap.add_argument("--shard-mb", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = ap.parse_args()
    if not (args.dir / "config.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(args.dir, args.layers, args.shard_mb << 20, args.family)
        print(f"wrote {args.dir} in {time.perf_counter() - t0:.0f} s")
    size_mb = sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 2**20
    params = sum(torch.Size(s).numel() for s in _shapes(args.dir))
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in CHILD}
    for _ in range(args.repeats):  # interleaved, so drift hits all three alike
        for kind in CHILD:
            runs[kind].append(measure(kind, args.dir))
    med = {k: {m: sorted(r[m] for r in v)[len(v) // 2] for m in ("seconds", "peak_rss_mb")} for k, v in runs.items()}
    budget = 1.25 * size_mb + med["empty"]["peak_rss_mb"]
    worst = max(med["load_checkpoint"]["peak_rss_mb"], med["load_and_forward"]["peak_rss_mb"])
    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "checkpoint": {"family": args.family, "layers": args.layers, "params": params, "size_mb": round(size_mb, 1),
                       "shards": len(list(args.dir.glob("*.safetensors")))},
        "median": med, "runs": runs,
        # seconds beyond the empty process's start-up (python + torch imports)
        "read_files_s": round(med["read_files"]["seconds"] - med["empty"]["seconds"], 2),
        "load_checkpoint_s": round(med["load_checkpoint"]["seconds"] - med["empty"]["seconds"], 2),
        "rss_budget_mb": round(budget, 1), "rss_within_budget": worst <= budget,
        "peak_rss_over_checkpoint": round((worst - med["empty"]["peak_rss_mb"]) / size_mb, 3),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.dir)


def _shapes(path: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open

    shapes = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            shapes += [tuple(h.get_slice(k).get_shape()) for k in h.keys()]
    return shapes


if __name__ == "__main__":
    main()
