"""Token-budget scheduling: admission by slots and by the columns a step runs, priorities (lower first, ties
in arrival order), a request that does not fit waits, one larger than the budget runs alone; and the same
by free KV pages; and the same through the real server (--max-num-batched-tokens, --kv-cache-memory, the
`priority` field on every route)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from clients.protocol import SamplingParams
from server.request import Request, RequestGroup
from tests.server_utils import ServerProcess, long_request, metrics, sse_events
from tzd.sampling import plan
from tzd.sampling.scheduler import QueueFull, Scheduler, Status


def req(total: int, priority: int = 0, prompt: int = 8) -> Request:
    """A request whose canvas (its cost) is `total` columns."""
    p = plan(SamplingParams(max_tokens=total - prompt), prompt, 4096)
    r = RequestGroup("t").add([1] * prompt, p, None)  # type: ignore[arg-type] - no output is rendered here
    r.priority = priority
    return r


def admitted(s: Scheduler) -> list[Request]:
    return s.schedule()[2]


def test_admission_by_tokens_then_slots() -> None:
    s = Scheduler(max_running=8, max_waiting=16, max_tokens=100)
    a, b, c, d = req(40), req(40), req(40), req(10)
    s.submit([a, b, c, d])
    assert admitted(s) == [a, b]  # 80 columns; c (40) would make 120: it waits, and d behind it too
    assert s.running_tokens == 80 and s.waiting == [c, d]
    assert admitted(s) == []
    s.finish(a, "length")
    s.finish(a, "stop")  # idempotent: the first reason stays
    assert s.running_tokens == 40 and (a.status, a.reason) == (Status.FINISHED, "length")
    assert b.status is Status.RUNNING and c.status is Status.WAITING
    assert admitted(s) == [c, d]  # 40 + 40 + 10 = 90
    slots = Scheduler(max_running=2, max_waiting=16, max_tokens=1000)
    slots.submit([req(10), req(10), req(10)])
    assert len(admitted(slots)) == 2  # the slots bind before the tokens do


def test_no_budget_admits_by_count_only() -> None:
    s = Scheduler(max_running=3, max_waiting=16)
    rs = [req(4000) for _ in range(4)]
    s.submit(rs)
    assert admitted(s) == rs[:3]


def test_priorities_lower_first_ties_fifo() -> None:
    s = Scheduler(max_running=1, max_waiting=16, max_tokens=1000)
    a, b, c, d, e = req(10, 0), req(10, 5), req(10, -1), req(10, 0), req(10, -1)
    s.submit([a, b])
    s.submit([c, d, e])
    order = []
    while s.has_work():
        [r] = admitted(s)
        order.append(r)
        s.finish(r, "length")
    assert order == [c, e, a, d, b]


def test_oversize_request_waits_then_runs_alone() -> None:
    s = Scheduler(max_running=8, max_waiting=16, max_tokens=100)
    small, big, after = req(30), req(250), req(20)
    s.submit([small])
    assert admitted(s) == [small]
    s.submit([big, after])
    assert admitted(s) == []  # big does not fit beside small, and `after` does not jump the line
    s.finish(small, "length")
    assert admitted(s) == [big]  # alone, over the budget
    assert admitted(s) == []  # nothing joins it
    s.finish(big, "length")
    assert admitted(s) == [after]


def test_cancel_and_expire_keep_the_queue_ordered() -> None:
    s = Scheduler(max_running=1, max_waiting=3, max_tokens=100)
    a, b, c = req(10, 2), req(10, 1), req(10, 0)
    s.submit([a, b, c])
    with pytest.raises(QueueFull):
        s.submit([req(10)])
    s.cancel(b)
    b.deadline = None
    a.deadline = 0.0
    assert s.expire(1.0) == ([a], [])
    assert s.waiting == [c] and admitted(s) == [c]
    c.deadline = 0.0
    assert s.expire(1.0) == ([], [c]) and s.running_tokens == 0


def pages(r: Request) -> int:
    """A 16-position page per started 16 columns of canvas (what DenoiseBatch.pages_for counts with the cache)."""
    return -(-r.plan.total_len // 16)


def test_admission_by_kv_pages() -> None:
    """Pages bind like tokens: the first in line waits for free pages (and so does everyone behind it),
    priorities still order the line, and finishing gives the pages back."""
    s = Scheduler(max_running=8, max_waiting=16, max_pages=10, pages=pages)
    # the running ones as urgent as `urgent` below: equals never preempt each other (see the preemption tests)
    a, b, c, d = req(64, -1), req(64, -1), req(48, -1), req(16, -1)  # 4, 4, 3, 1 pages
    s.submit([a, b, c, d])
    assert admitted(s) == [a, b] and s.running_pages == 8  # c needs 3 of the 2 left; d waits behind it
    s.finish(a, "length")
    assert admitted(s) == [c, d] and s.running_pages == 8
    urgent, later = req(64, priority=-1), req(16, priority=0)
    s.submit([later, urgent])
    assert admitted(s) == []  # urgent (4 pages) is first in line though submitted last; 2 are free
    s.finish(b, "length")
    assert admitted(s) == [urgent, later] and s.running_pages == 9
    for r in (c, d, urgent, later):
        s.finish(r, "length")
    assert s.running_pages == 0


def schedule(s: Scheduler) -> tuple[list[Request], list[Request]]:
    """(preempted, admitted) of one schedule()."""
    _, preempt, admit = s.schedule()
    return preempt, admit


def test_a_higher_priority_preempts_the_lowest_for_pages() -> None:
    """The lowest priority goes first (the latest arrival among equals), as many as make room and none that
    is not needed; the preempted wait at their old place and run again (status PREEMPTED, then RUNNING)."""
    s = Scheduler(max_running=8, max_waiting=16, max_pages=10, pages=pages)
    a, b, c = req(64, 1), req(64, 2), req(32, 2)  # 4, 4, 2 pages: the cache is full
    s.submit([a, b, c])
    assert schedule(s) == ([], [a, b, c])
    urgent = req(48, 0)  # 3 pages: c (lowest, latest) alone frees 2, too few; b frees 4 and c is not needed
    s.submit([urgent])
    assert schedule(s) == ([b], [urgent]) and s.running_pages == 9
    assert (b.status, b.preemptions, c.status) == (Status.PREEMPTED, 1, Status.RUNNING)
    later = req(16, 2)  # 1 page, arrived after b: b goes first, and does not fit yet; later waits behind it
    s.submit([later])
    assert schedule(s) == ([], []) and s.waiting == [b, later]
    s.finish(urgent, "length")
    assert schedule(s) == ([], [b]) and b.status is Status.RUNNING  # 4 + 2 + 4 = 10: later still waits
    s.finish(b, "length")
    assert schedule(s) == ([], [later])


def test_a_higher_priority_preempts_for_a_slot_but_never_for_tokens_or_equals() -> None:
    slots = Scheduler(max_running=2, max_waiting=16)
    a, b = req(16, 1), req(16, 1)
    slots.submit([a, b])
    schedule(slots)
    same = req(16, 1)
    slots.submit([same])
    assert schedule(slots) == ([], [])  # an equal waits
    urgent = req(16, 0)
    slots.submit([urgent])
    assert schedule(slots) == ([b], [urgent])  # the latest of the lowest
    assert slots.waiting == [b, same]  # b at its old place: before `same`, which arrived after it
    tokens = Scheduler(max_running=8, max_waiting=16, max_tokens=100)
    low, high = req(60, 1), req(60, 0)
    tokens.submit([low])
    schedule(tokens)
    tokens.submit([high])
    assert schedule(tokens) == ([], [])  # the token budget alone never preempts
    none_free = Scheduler(max_running=8, max_waiting=16, max_pages=4, pages=pages)
    small, big = req(32, 1), req(96, 0)  # big (6 pages) is larger than the whole cache: no preemption helps
    none_free.submit([small])
    schedule(none_free)
    none_free.submit([big])
    assert schedule(none_free) == ([], []) and small.status is Status.RUNNING


def test_a_preempted_request_that_finishes_leaves_the_line() -> None:
    s = Scheduler(max_running=1, max_waiting=16)
    low, high = req(16, 1), req(16, 0)
    s.submit([low])
    schedule(s)
    s.submit([high])
    assert schedule(s) == ([low], [high])
    s.finish(low, "aborted")  # the output side ended it while it waited (or a drain): it never runs again
    assert s.waiting == [] and (low.status, low.reason) == (Status.FINISHED, "aborted")


def test_request_larger_than_free_pages_waits_then_runs() -> None:
    s = Scheduler(max_running=8, max_waiting=16, max_pages=6, pages=pages)
    small, big = req(32), req(96)  # 2 and 6 pages: big takes the whole cache
    s.submit([small, big])
    assert admitted(s) == [small]
    assert admitted(s) == []  # 4 free: big waits
    s.finish(small, "length")
    assert admitted(s) == [big] and s.running_pages == 6


@pytest.fixture(scope="module")
def srv(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--max-batch-size", "4",
                       "--max-num-batched-tokens", "48", log_dir=tmp_path_factory.mktemp("srvlog")) as s:
        yield s


def test_server_token_budget_and_priority(srv: ServerProcess) -> None:
    health = httpx.get(f"{srv.url}/health", timeout=10).json()
    assert health["max_num_batched_tokens"] == 48 and health["max_batch_size"] == 4
    ids = [5 + i for i in range(8)]
    bodies = [{"prompt": ids, "max_tokens": 16, "seed": i, "priority": i % 3} for i in range(6)]  # 24 columns
    bodies.append({"prompt": ids * 6, "max_tokens": 32, "seed": 9, "priority": -1})  # 80: over the whole budget
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{srv.url}/generate", json=b, timeout=120), bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies), [a.text for a in answers]
    assert all(a.json()["finish_reason"] in ("length", "stop") for a in answers)
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 4, "priority": 3}, timeout=60)
    assert r.status_code == 200, r.text
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "priority": 3}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=chat, timeout=60)  # the tiny model has no template:
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text  # priority itself passed
    with httpx.stream("POST", f"{srv.url}/generate", json={"prompt": "x", "max_tokens": 4, "priority": -5,
                                                          "stream": True}, timeout=60) as r:
        assert [e for e, _ in sse_events(r)][-1] == "done"
    for path, body in [("/generate", {"prompt": "x"}), ("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
        for bad in ("1", 1.5, 2**31):
            r = httpx.post(f"{srv.url}{path}", json={**body, "priority": bad}, timeout=30)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "priority", r.text
    spec = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
    assert json.dumps(spec).count('"priority"') >= 3  # in each request schema


def test_server_kv_pages_bound_admission(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--kv-cache-memory of 4 pages (16 positions each, 16 KiB apiece for the tiny model in fp32): cached
    requests of 3 pages run one at a time, all succeed with the tokens each gets alone (batch-invariant
    kernels, so only the paging could change them); one needing 5 pages is refused naming max_tokens, and
    the same request without the cache runs."""
    page = 2 * 2 * 16 * 4 * 16 * 4
    gib = f"{4.5 * page / (1 << 30):.10f}"
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--max-batch-size", "4", "--deterministic", "on",
                       "--kv-cache-memory", gib, log_dir=tmp_path) as srv:
        health = httpx.get(f"{srv.url}/health", timeout=10).json()
        assert health["kv_cache_pages"] == 4 and health["kv_cache_usage"] == 0.0
        bodies = [{"prompt": [5 + i] * 8, "max_tokens": 40, "steps": 20, "block_length": 8, "cache": "dual",
                   "seed": i} for i in range(4)]
        alone = [httpx.post(f"{srv.url}/generate", json=b, timeout=120).json()["tokens"] for b in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{srv.url}/generate", json=b, timeout=120), bodies))
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert [a.json()["tokens"] for a in answers] == alone
        big = {"prompt": [5] * 8, "max_tokens": 64, "cache": "dual"}
        r = httpx.post(f"{srv.url}/generate", json=big, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert "5 KV pages" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/generate", json={**big, "cache": "none"}, timeout=60)
        assert r.status_code == 200, r.text
        assert metrics(srv.url)["tzd_kv_cache_usage"] == 0.0


def test_server_preempts_a_lower_priority_stream_which_goes_on_where_it_was(tiny_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    """One slot: a priority 1 stream runs; a priority 0 request arrives, takes the slot and finishes first;
    the stream pauses, is recomputed and goes on: each step once and in order (no step event is repeated,
    none lost: its committed positions are each reported once), the tokens it gets alone."""
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", "--max-batch-size", "1", "--deterministic", "on",
                       log_dir=tmp_path) as srv:
        low = {**long_request(srv.url, 80), "priority": 1}
        alone = httpx.post(f"{srv.url}/generate", json=low, timeout=120).json()
        high = {"prompt": "JULIET:", "max_tokens": 8, "steps": 8, "seed": 2, "priority": 0}
        high_alone = httpx.post(f"{srv.url}/generate", json=high, timeout=120).json()
        order: list[str] = []
        events: list[dict] = []
        with ThreadPoolExecutor(1) as pool:
            with httpx.stream("POST", f"{srv.url}/generate", json={**low, "stream": True}, timeout=120) as r:
                answer = None
                for name, data in sse_events(r):
                    if name == "step":
                        events.append(json.loads(data))
                        if len(events) == 3:  # it runs: now the urgent one
                            urgent = pool.submit(lambda: (httpx.post(f"{srv.url}/generate", json=high,
                                                                     timeout=120), order.append("high")))
                    elif name == "done":
                        order.append("low")
                        answer = json.loads(data)
            got_high = urgent.result()[0]
        assert got_high.status_code == 200 and got_high.json()["tokens"] == high_alone["tokens"]
        m = metrics(srv.url)
        assert m["tzd_preemptions_total"] >= 1 and m["tzd_recomputed_steps_total"] >= 3, m
        assert order == ["high", "low"]
        steps = [e["step"] for e in events]
        assert steps == sorted(set(steps)) and steps[-1] == answer["steps"] - 1
        positions = [c["position"] for e in events for c in e["committed"]]
        assert sorted(positions) == list(range(80))
        assert answer["tokens"] == alone["tokens"] and answer["nfe"] == alone["nfe"]
