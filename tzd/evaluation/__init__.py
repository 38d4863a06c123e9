"""lm-evaluation-harness for TZD: the `tzd` model (lm_eval_model.py) and the shipped task's YAML (tasks/).

lm-eval 0.4 finds models only in its own registry, filled at import time, and has no plugin hook for an
outside package; importing this package registers `tzd` there. From the command line,
`python -m tzd.evaluation ...` is lm-eval's own CLI (every flag unchanged) with `tzd` registered;
from Python, `import tzd.evaluation` before `lm_eval.simple_evaluate(model="tzd", ...)`.
"""

from __future__ import annotations

from pathlib import Path

from tzd.evaluation.lm_eval_model import TZDLM

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # for --include_path / TaskManager(include_path=...)

__all__ = ["TASKS_DIR", "TZDLM"]
