"""`python -m tests.bf16_cpu_server <server flags>`: the real `python -m server` as it runs on a CPU with
bf16 units (avx512_bf16 / AMX), where `--dtype auto` is bf16 autocast with the linear layers stored in
bf16. On a CPU without them (this CI's) oneDNN emulates the same bf16 arithmetic, slower; only the
capability check is answered here, every kernel is the real one."""

from __future__ import annotations

import runpy

import server.runtime

server.runtime.cpu_has_bf16 = lambda: True
runpy.run_module("server", run_name="__main__", alter_sys=True)
