"""Copy a checkpoint for shipping: weights in a chosen dtype, no training state.

    python -m trainer.export runs/shakespeare-small/best models/shakespeare-small --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys

import torch

from tzd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

# what save_checkpoint writes itself; "special_ids" only older checkpoints have (never read): not carried over
OWN_KEYS = ("format_version", "model", "special_ids", "weights_dtype")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                    help="add a fact to config.json's training section (e.g. machine=...); repeatable")
    args = ap.parse_args(argv)
    try:
        loaded = load_checkpoint(args.src, device="cpu")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
