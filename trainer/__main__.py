"""Entry point: `python -m trainer [group=option ...] [key=value ...]` (Hydra-style overrides).

Exit status: 0 trained and saved; 2 bad config, data or checkpoint (one `error:` line); 3 trained and
saved, but a side task (validation, samples, logging) failed on the way (the `error:` line names each).
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

EXIT_BAD_INPUT = 2
EXIT_SIDE_TASK_FAILED = 3


def main(argv: list[str] | None = None) -> int:
    from trainer.config import ConfigError, load_config
    from trainer.data import DataError
    from trainer.side_tasks import SideTaskError
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
    except SideTaskError as e:
        _leave_process_group()
        print(f"checkpoint: {e.checkpoint}")
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SIDE_TASK_FAILED
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _leave_process_group()
    print(f"checkpoint: {last}")
    return 0


def _leave_process_group() -> None:
    """Destroy the distributed process group (DDP/FSDP runs) while the interpreter is fully alive: left to
    interpreter shutdown, gloo's worker threads can still hold tensors and the process dies with SIGABRT
    ("terminate called without an active exception") after its checkpoint is written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
