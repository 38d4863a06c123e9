"""Copy a checkpoint for shipping: weights in a chosen dtype, no training state; or write it in LLaDA's
Hugging Face layout (config.json, safetensors, tokenizer.json) for tools built for LLaDA.

    python -m trainer.export runs/shakespeare-small/best models/shakespeare-small --dtype bfloat16
    python -m trainer.export models/shakespeare-small /tmp/shakespeare-llada --format llada
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tzd.checkpoint import CheckpointError, Loaded, load_checkpoint, save_checkpoint
from tzd.hf import FAMILIES
from tzd.hf.export import save_family
from tzd.hf.sentencepiece import tokenizer_json
from tzd.tokenizer import Tokenizer

# what save_checkpoint writes itself; "special_ids" only older checkpoints have (never read): not carried over
OWN_KEYS = ("format_version", "model", "special_ids", "weights_dtype")


def export_llada(loaded: Loaded, dst: str, dtype: torch.dtype, shard_mb: float | None) -> Path:
    """The checkpoint in LLaDA's layout; load_checkpoint reads it back to the same logits."""
    cfg = loaded.model_config
    if cfg.backend != "smdm" or cfg.causal or cfg.rotary_fraction != 1.0 or cfg.logit_shift:
        raise ValueError(f"{loaded.path}: --format llada needs a bidirectional smdm model with full RoPE "
                         f"(this one: backend {cfg.backend}, causal {cfg.causal}, rotary_fraction "
                         f"{cfg.rotary_fraction})")
    if not isinstance(loaded.tokenizer, Tokenizer):
        raise ValueError(f"{loaded.path}: already in a Hugging Face layout")
    sp = loaded.special
    ids = {"mask_token_id": sp.mask, "eos_token_id": sp.eos, "pad_token_id": sp.pad, "bos_token_id": sp.bos}
    out = save_family(loaded.model, FAMILIES["llada"], dst, ids, dtype=dtype,
                      shard_bytes=None if shard_mb is None else int(shard_mb * 2**20),
                      generation={"bos_token_id": sp.bos, "eos_token_id": sp.eos, "pad_token_id": sp.pad})
    tokenizer_json(loaded.tokenizer.path).save(str(out / "tokenizer.json"))
    piece = loaded.tokenizer.sp.id_to_piece  # the SentencePiece pieces of the special ids
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(sp.bos), "eos_token": piece(sp.eos),
                  "pad_token": piece(sp.pad), "unk_token": piece(sp.unk), "mask_token": piece(sp.mask),
                  "model_max_length": cfg.context_len}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--format", default="tzd", choices=["tzd", "llada"],
                    help="tzd: TZD's own directory; llada: LLaDA's Hugging Face layout (smdm models)")
    ap.add_argument("--shard-mb", type=float, default=None, help="with --format llada: shards of at most this size")
    ap.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                    help="add a fact to config.json's training section (e.g. machine=...); repeatable")
    args = ap.parse_args(argv)
    try:
        loaded = load_checkpoint(args.src, device="cpu")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "llada":
        try:
            out = export_llada(loaded, args.dst, getattr(torch, args.dtype), args.shard_mb)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"wrote {out} in LLaDA's layout ({size / 1e6:.1f} MB, weights in {args.dtype})")
        return 0
    meta = {k: v for k, v in loaded.config.items() if k not in OWN_KEYS}
    for note in args.note:
        key, sep, value = note.partition("=")
        if not sep:
            print(f"error: --note {note!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        meta.setdefault("training", {})[key] = value
    out = save_checkpoint(args.dst, loaded.model, loaded.model_config, loaded.tokenizer.path, meta,
                          weights_dtype=getattr(torch, args.dtype))
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB, weights in {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
