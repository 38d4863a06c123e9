"""`python -m tests.slow_server <server flags>`: the real `python -m server`, with every denoising step
delayed by TZD_TEST_STEP_DELAY seconds, so that a test can act while requests are still in flight on a
tiny model that would otherwise finish them in a blink."""

from __future__ import annotations

import os
import runpy

from tests.server_utils import delayed
from tzd.sampling.batch import DenoiseBatch

DELAY = float(os.environ.get("TZD_TEST_STEP_DELAY", "0.02"))
_real_step = DenoiseBatch.step


def _slow_step(self: DenoiseBatch) -> list:
    return delayed(lambda: _real_step(self), DELAY)()


DenoiseBatch.step = _slow_step  # type: ignore[method-assign]
runpy.run_module("server", run_name="__main__", alter_sys=True)
