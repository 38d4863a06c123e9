"""`python -m tests.slow_server <server flags>`: the real `python -m server`, with every denoising step
delayed by TZD_TEST_STEP_DELAY seconds, so that a test can act while requests are still in flight on a
tiny model that would otherwise finish them in a blink."""

from __future__ import annotations

import os
import runpy
import time

from tzd.sampling.batch import DenoiseBatch

DELAY = float(os.environ.get("TZD_TEST_STEP_DELAY", "0.02"))
_real_step = DenoiseBatch.step


def _slow_step(self: DenoiseBatch):  # noqa: ANN202
    time.sleep(DELAY)
    return _real_step(self)


DenoiseBatch.step = _slow_step  # type: ignore[method-assign]
runpy.run_module("server", run_name="__main__", alter_sys=True)
