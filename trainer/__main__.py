"""Entry point: `python -m trainer [group=option ...] [key=value ...]` (Hydra-style overrides)."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf


def main(argv: list[str] | None = None) -> int:
    from trainer.config import ConfigError, load_config
    from trainer.data import DataError
    from tzd.checkpoint import CheckpointError

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__ or "")
        print(OmegaConf.to_yaml(load_config([])))
        return 0
    try:
        cfg = load_config(args)
        from trainer.loop import train

        last = train(cfg)
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"checkpoint: {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
