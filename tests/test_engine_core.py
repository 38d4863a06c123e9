"""The engine core (tzd.sampling.core): one scheduler over one DenoiseBatch, driven step by step the same
way by offline generate() and the server; each request's status and finish reason in its own record."""

from __future__ import annotations

import pytest
import torch

from tzd.models import ModelConfig, build_model
from tzd.sampling import CoreRequest, DenoiseBatch, EngineConfig, EngineCore, SamplingParams, Status, generate, plan

V, MASK = 61, 60


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, context_len=64)).eval()


def request(prompt_len: int, max_tokens: int, priority: int = 0, deadline: float | None = None,
            cache: str = "none") -> CoreRequest:
    p = plan(SamplingParams(max_tokens=max_tokens, steps=max_tokens, block_length=max_tokens, seed=1, cache=cache),
             prompt_len, 64)
    return CoreRequest([1] * prompt_len, p, priority=priority, deadline=deadline)


def run(core: EngineCore) -> list:
    outs = []
    while core.has_work():
        outs.append(core.step(now=0.0))
    return outs


def test_a_step_admits_runs_and_finishes_with_reasons(model: torch.nn.Module) -> None:
    core = EngineCore(DenoiseBatch(model, MASK, capacity=2), max_waiting=8)
    a, b, c = request(4, 2), request(4, 3), request(4, 2)
    core.submit([a, b, c])
    first = core.step(now=0.0)
    assert first.admitted == [a, b] and first.batch_size == 2 and c.status is Status.WAITING
    assert [ev.handle for ev in first.events] == [a, b] and a.status is Status.RUNNING
    second = core.step(now=0.0)  # a finishes (2 steps); its slot is free for c at the next step
    assert [ev.done for ev in second.events] == [True, False]
    assert (a.status, a.reason) == (Status.FINISHED, "length") and c.status is Status.WAITING
    third = core.step(now=0.0)
    assert third.admitted == [c]
    run(core)
    assert all(r.status is Status.FINISHED and r.reason == "length" for r in (a, b, c))
    assert len(core.batch) == 0 and core.scheduler.running_pages == 0


def test_cancel_abort_and_deadline_leave_at_the_next_step(model: torch.nn.Module) -> None:
    core = EngineCore(DenoiseBatch(model, MASK, capacity=4), max_waiting=8)
    cancelled, aborted, late, waiting_late, ok = (request(4, 8), request(4, 8), request(4, 8, deadline=5.0),
                                                  request(4, 8, priority=1, deadline=5.0), request(4, 8))
    core.submit([cancelled, aborted, late, ok])
    core.step(now=0.0)
    core.submit([waiting_late])  # no slot: it waits
    core.cancel(cancelled)
    core.abort(aborted)  # the output side ended it (a stop string)
    out = core.step(now=10.0)  # past both deadlines
    assert out.expired == [waiting_late, late]
    assert [ev.handle for ev in out.events] == [ok] and len(core.batch) == 1
    assert [(r.status, r.reason) for r in (cancelled, aborted, late, waiting_late)] == [
        (Status.FINISHED, "cancelled"), (Status.FINISHED, "aborted"), (Status.FINISHED, "timeout"),
        (Status.FINISHED, "timeout")]
    run(core)
    assert ok.reason == "length"


def test_a_failing_step_fails_its_requests_and_the_core_serves_on(model: torch.nn.Module) -> None:
    batch = DenoiseBatch(model, MASK, capacity=2)
    core = EngineCore(batch, max_waiting=8)
    a = request(4, 4)
    core.submit([a])
    real = batch.step
    batch.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    out = core.step(now=0.0)
    assert isinstance(out.error, RuntimeError) and out.failed == [a] and (a.status, a.reason) == (
        Status.FINISHED, "error")
    assert len(batch) == 0 and not core.has_work()
    batch.step = real  # type: ignore[method-assign]
    b = request(4, 2)
    core.submit([b])
    run(core)
    assert b.reason == "length"


def test_offline_generate_admits_by_priority_like_the_server(model: torch.nn.Module) -> None:
    """generate() goes through the same scheduler: with one slot, the lower priority runs first."""
    seen: list[int] = []
    params = [SamplingParams(max_tokens=2, steps=2, seed=i, priority=p) for i, p in enumerate((5, -1, 0))]
    out = generate(model, [[1, 2], [3, 4], [5, 6]], params, MASK, max_batch=1,
                   on_step=lambda i, ev: seen.append(i) if ev.step == 0 else None)
    assert seen == [1, 2, 0] and all(len(r.tokens) == 2 for r in out)


def test_offline_generate_refuses_a_request_larger_than_the_kv_cache(model: torch.nn.Module) -> None:
    """It raises at once, naming the pages (before, such a request waited for pages that never came)."""
    from tzd.sampling.batch import kv_shape
    from tzd.sampling.kv_pages import PagedKVStore

    cfg = model.tzd_config
    page = PagedKVStore.page_bytes(*kv_shape(cfg), 16, torch.float32)
    with pytest.raises(ValueError, match="KV pages"):
        generate(model, [[1] * 8], SamplingParams(max_tokens=40, cache="dual"), MASK, kv_cache_bytes=2 * page)


def steps_by_request(outs: list) -> dict:
    """Each request's reported events, in order (the handle is the request)."""
    seen: dict = {}
    for out in outs:
        for ev in out.events:
            seen.setdefault(ev.handle, []).append(ev)
    return seen


def alone(model: torch.nn.Module, req: CoreRequest, **batch_kw) -> list:
    """`req`'s events run by itself in a fresh core."""
    core = EngineCore(DenoiseBatch(model, MASK, capacity=1, **batch_kw))
    twin = CoreRequest(req.prompt_ids, req.plan)
    core.submit([twin])
    return steps_by_request(run(core))[twin]


@pytest.mark.parametrize("by", ["slot", "pages"])
def test_preempted_request_is_recomputed_exactly_and_reports_each_step_once(model: torch.nn.Module,
                                                                               by: str) -> None:
    """A higher priority takes the slot (or the KV pages) of a running lower one; the lower one waits, runs
    again from its first step and its consumer sees every step once, in order, the same as if it had run
    alone: the recomputation repeats its commits exactly (sampled with temperature, so a different draw
    would show)."""
    from tzd.sampling.batch import kv_shape
    from tzd.sampling.kv_pages import PagedKVStore

    def req(prompt: int, n: int, priority: int, seed: int) -> CoreRequest:
        sp = SamplingParams(max_tokens=n, steps=n, block_length=8, seed=seed, temperature=1.0,
                            cache="dual" if by == "pages" else "none")
        return CoreRequest(list(range(1, prompt + 1)), plan(sp, prompt, 64), priority=priority)

    page = PagedKVStore.page_bytes(*kv_shape(model.tzd_config), 16, torch.float32)
    kw = {"kv_cache_bytes": 2 * page} if by == "pages" else {}  # 32 positions: one request at a time
    core = EngineCore(DenoiseBatch(model, MASK, capacity=1 if by == "slot" else 4, **kw))
    low, high = req(6, 24, priority=1, seed=3), req(4, 16, priority=0, seed=4)
    core.submit([low])
    outs = [core.step(now=0.0) for _ in range(5)]
    core.submit([high])
    outs.append(core.step(now=0.0))
    assert outs[-1].preempted == [low] and outs[-1].admitted == [high] and low.status is Status.PREEMPTED
    assert [ev.handle for ev in outs[-1].events] == [high]
    outs += run(core)
    seen = steps_by_request(outs)
    assert [ev.step for ev in seen[low]] == list(range(24)) and low.preemptions == 1 and low.replay == 5
    assert sum(o.replayed for o in outs) == 5 and (low.reason, high.reason) == ("length", "length")
    assert seen[high][-1].done and seen[high][0].step == 0
    for r in (low, high):
        ref = alone(model, r, **kw)
        assert [(ev.step, ev.positions.tolist(), ev.tokens.tolist(), ev.nfe) for ev in seen[r]] == \
            [(ev.step, ev.positions.tolist(), ev.tokens.tolist(), ev.nfe) for ev in ref]
        assert seen[r][-1].canvas.tolist() == ref[-1].canvas.tolist()
    assert len(core.batch) == 0 and core.scheduler.running_pages == 0


def test_the_core_keeps_its_own_sampling_params() -> None:
    """plan() converts the wire schema once: the plan holds the core's DecodeParams, and the core's modules
    import the wire schema for types only (its default block length agrees with the wire schema's)."""
    import ast
    from pathlib import Path

    import clients.protocol as wire
    import tzd.sampling as sampling
    from tzd.sampling import DecodeParams
    from tzd.sampling.params import DEFAULT_BLOCK_LENGTH

    p = plan(SamplingParams(max_tokens=8, temperature=0.5, stop=["x"], top_logprobs=2), 4, 64)
    assert p.params == DecodeParams(temperature=0.5, stop=("x",), top_logprobs=2)
    assert DEFAULT_BLOCK_LENGTH == wire.DEFAULT_BLOCK_LENGTH
    public = {"__init__.py", "generate.py"}  # generate(prompts, params: SamplingParams, ...) is the public way in
    for f in Path(sampling.__file__).parent.glob("*.py"):
        if f.name in public:
            continue
        tree = ast.parse(f.read_text())
        for node in tree.body:  # module level only: an `if TYPE_CHECKING:` block is not an Import node here
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clients"):
                raise AssertionError(f"{f.name} imports {node.module} at run time")


def test_engine_config_builds_the_core_and_names_a_bad_field(model: torch.nn.Module) -> None:
    from tzd.sampling.batch import kv_shape
    from tzd.sampling.kv_pages import PagedKVStore

    page = PagedKVStore.page_bytes(*kv_shape(model.tzd_config), 8, torch.float32)
    core = EngineCore.create(model, MASK, EngineConfig(max_batch_size=3, max_waiting=5, max_batched_tokens=100,
                                                       kv_cache_bytes=7 * page + 1, kv_page_size=8))
    assert (core.batch.capacity, core.scheduler.max_running, core.scheduler.max_waiting) == (3, 3, 5)
    assert (core.scheduler.max_tokens, core.batch.kv.num_pages, core.batch.kv.page_size) == (100, 7, 8)
    dense = EngineCore.create(model, MASK, EngineConfig(max_batch_size=2, kv_page_size=16))
    assert dense.batch.kv.num_pages == 2 * 4  # every slot a whole context of 64 positions
    for bad in ({"max_batch_size": 0}, {"kv_page_size": 0}, {"max_batched_tokens": 0}, {"kv_cache_bytes": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)
