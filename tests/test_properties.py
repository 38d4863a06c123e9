"""Property-based tests (hypothesis): the commit rule and the step plan, stop-string cutting and holding
back, a slow reader's merged updates, and server-sent events parsed back under any chunking."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import torch
from httpx_sse import EventSource
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sse_starlette import ServerSentEvent

from clients import EventStream, StepEvent
from clients.protocol import CommittedToken
from server.output import Result, Update, stable_prefix
from server.request import UpdateQueue
from server.streams import SEP
from tzd.models import ModelConfig, build_model
from tzd.sampling import DenoiseBatch, SamplingParams, SamplingParamsError, finish, plan
from tzd.sampling.rules import select_commits

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- the commit rule ----------------------------------------------------------------------------------

@st.composite
def commit_inputs(draw: st.DrawFn) -> tuple:
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    conf = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=rows * cols, max_size=rows * cols))
    mask = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    steps_left = draw(st.lists(st.integers(1, 16), min_size=rows, max_size=rows))
    thresholds = draw(st.lists(st.sampled_from([0.0, 0.3, 0.6, 0.9, 1.0]), min_size=rows, max_size=rows))
    return (torch.tensor(conf).view(rows, cols), torch.tensor(mask).view(rows, cols), torch.tensor(steps_left),
            torch.tensor(thresholds))


@SETTINGS
@given(commit_inputs())
def test_commit_rule_commits_between_one_and_the_masks(inputs: tuple) -> None:
    conf, is_mask, steps_left, threshold = inputs
    select, count = select_commits(conf, is_mask, steps_left, threshold, any_threshold=True)
    for r in range(conf.shape[0]):
        masked = int(is_mask[r].sum())
        chosen = select[r]
        assert not (chosen & ~is_mask[r]).any()  # only masked positions are committed
        assert int(chosen.sum()) == int(count[r])
        if masked:
            assert 1 <= int(count[r]) <= masked
            linear = math.ceil(masked / int(steps_left[r]))
            assert int(count[r]) >= min(linear, masked)
            if threshold[r] > 0:  # every masked position at or above the threshold is committed
                assert bool(chosen[is_mask[r] & (conf[r] >= threshold[r])].all())
            else:
                assert int(count[r]) == min(linear, masked)
            # the committed ones are the most confident masked positions
            if 0 < int(count[r]) < masked:
                assert float(conf[r][chosen].min()) >= float(conf[r][is_mask[r] & ~chosen].max())
        else:
            assert int(count[r]) == 0


# ---- the step plan and the sampler's invariants -------------------------------------------------------

@st.composite
def requests(draw: st.DrawFn) -> tuple[SamplingParams, int]:
    max_tokens = draw(st.integers(1, 24))
    block = draw(st.integers(1, max_tokens))
    blocks = math.ceil(max_tokens / block)
    steps = draw(st.integers(blocks, max_tokens))
    params = SamplingParams(max_tokens=max_tokens, block_length=block, steps=steps,
                            threshold=draw(st.sampled_from([None, 0.5, 0.9])),
                            remasking=draw(st.sampled_from(["low_confidence", "random"])),
                            temperature=draw(st.sampled_from([0.0, 1.0])), seed=draw(st.integers(0, 2**31)))
    return params, draw(st.integers(1, 8))


@SETTINGS
@given(requests())
def test_the_schedule_adds_up(request: tuple[SamplingParams, int]) -> None:
    params, prompt_len = request
    p = plan(params, prompt_len, 64)
    base, extra = divmod(p.steps, p.num_blocks)
    lengths = [min(p.block_length, p.max_tokens - b * p.block_length) for b in range(p.num_blocks)]
    budgets = [min(base + (1 if b < extra else 0), lengths[b]) for b in range(p.num_blocks)]
    assert sum(lengths) == p.max_tokens and all(n >= 1 for n in lengths)
    assert all(1 <= k <= n for k, n in zip(budgets, lengths, strict=True))
    assert sum(budgets) <= p.steps and (sum(budgets) == p.steps
                                         or any(k == n for k, n in zip(budgets, lengths, strict=True)))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, context_len=40)).eval()


MASK = 63


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(requests(), min_size=1, max_size=3))
def test_each_step_commits_within_its_block_and_never_changes_a_token(
        model: torch.nn.Module, batch: list[tuple[SamplingParams, int]]) -> None:
    denoise = DenoiseBatch(model, MASK, capacity=len(batch), eos_id=None)
    plans = {}
    for i, (params, prompt_len) in enumerate(batch):
        plans[i] = plan(params, prompt_len, 40)
        denoise.add([1 + (i + j) % 50 for j in range(prompt_len)], plans[i], handle=i)
    committed: dict[int, dict[int, int]] = {i: {} for i in plans}
    steps_seen = {i: 0 for i in plans}
    while len(denoise):
        for ev in denoise.step():
            p, seen = plans[ev.handle], committed[ev.handle]
            block = min(pos // p.block_length for pos, _ in ev.committed)
            block_masks = [q for q in range(block * p.block_length, min((block + 1) * p.block_length, p.max_tokens))
                           if q not in seen]
            assert 1 <= len(ev.committed) <= len(block_masks)  # at least one, at most the block's masks
            assert all(pos // p.block_length == block for pos, _ in ev.committed)  # one block at a time
            for pos, tok in ev.committed:
                assert pos not in seen and tok != MASK
                seen[pos] = tok
            for pos, tok in seen.items():
                assert ev.canvas[pos] == tok  # a committed token never changes
            assert ev.masked == p.max_tokens - len(seen) == int((ev.canvas == MASK).sum())
            steps_seen[ev.handle] += 1
    for i, p in plans.items():
        assert len(committed[i]) == p.max_tokens and steps_seen[i] <= p.steps


def test_plan_rejects_what_the_schedule_cannot_run() -> None:
    with pytest.raises(SamplingParamsError, match="steps"):
        plan(SamplingParams(max_tokens=8, block_length=2, steps=3), 1, 64)


# ---- stop strings -------------------------------------------------------------------------------------

ALPHABET = "ab \n"
text = st.text(ALPHABET, max_size=20)
stops = st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3)


def cut(s: str, stop: list[str]) -> str:
    found = [s.find(x) for x in stop if x in s]
    return s[:min(found)] if found else s


@SETTINGS
@given(st.lists(st.integers(0, len(ALPHABET) - 1), max_size=20), stops, st.sampled_from([None, 3]))
def test_finish_cuts_at_eos_then_the_first_stop_string(ids: list[int], stop: list[str], eos: int | None) -> None:
    def decode(toks: list[int]) -> str:
        return "".join(ALPHABET[t] for t in toks)

    tokens, reason, out = finish(ids, "length", eos, stop, decode)
    before_eos = ids[:ids.index(eos)] if eos is not None and eos in ids else ids
    assert out == cut(decode(before_eos), stop) and not any(x in out for x in stop)
    assert decode(tokens) == out and tokens == before_eos[:len(tokens)]
    assert reason == ("stop" if len(before_eos) < len(ids) or out != decode(before_eos) else "length")


@SETTINGS
@given(text, text, stops)
def test_streamed_text_never_runs_past_a_stop_string(sofar: str, later: str, stop: list[str]) -> None:
    """What stable_prefix lets out of a text without a stop string is a prefix of the final cut text,
    whatever comes next."""
    sofar = cut(sofar, stop)
    sent = stable_prefix(sofar, stop)
    assert sofar.startswith(sent)
    assert cut(sofar + later, stop).startswith(sent)


# ---- a slow reader ------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(2, 30), st.integers(1, 6), st.lists(st.booleans(), min_size=1, max_size=40))
def test_a_slow_readers_updates_merge_without_losing_any(steps: int, backlog: int, reads: list[bool]) -> None:
    """Step updates put faster than they are read: at most `backlog` wait, and what is read holds every
    committed token once, the deltas in order, the steps increasing, and the result last."""
    queue, req = UpdateQueue(backlog), object()
    got: list[Update] = []
    for s in range(steps):
        done = s == steps - 1
        event = StepEvent(step=s, steps=steps, committed=[CommittedToken(position=s, id=s, text="t")],
                              masked=steps - s - 1, text="")
        queue.put_nowait((req, Update(event=event, delta=str(s % 10),
                                      result=Result([], "", "length", steps, steps, steps) if done else None)))
        assert len(queue) <= backlog
        if reads[s % len(reads)]:
            got.append(queue._items.popleft()[1])  # a read, as UpdateQueue.get does
            queue._unread[req] -= 1
    while len(queue):
        got.append(queue._items.popleft()[1])
    assert [c.position for u in got for c in u.event.committed] == list(range(steps))
    assert "".join(u.delta for u in got) == "".join(str(s % 10) for s in range(steps))
    assert [u.event.step for u in got] == sorted({u.event.step for u in got}) and got[-1].event.step == steps - 1
    assert got[-1].result is not None and all(u.result is None for u in got[:-1])


# ---- server-sent events under any chunking ------------------------------------------------------------

event_names = st.sampled_from(["step", "done", "error", "other", None])
payloads = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40)


@SETTINGS
@given(st.lists(st.tuples(event_names, payloads), max_size=8), st.lists(st.integers(1, 64), max_size=30),
       st.booleans())
@example([("step", "a\u2028b\x85c\x0bd \u00e9")], [3, 1, 1], True)  # line breaks to str.splitlines, not SSE
def test_sse_round_trips_through_any_chunking(events: list, cuts: list[int], keepalive: bool) -> None:
    """The server's framing (sse-starlette), split anywhere, even inside a UTF-8 character, and parsed by
    the SDK's parser (httpx-sse) gives back the same events."""
    events = [(name, data) for name, data in events if data]  # an event without data is no event
    wire = b""
    for name, data in events:
        if keepalive:
            wire += ServerSentEvent(comment="keep-alive", sep=SEP).encode()
        wire += ServerSentEvent(data=data, event=name, sep=SEP).encode()
    chunks, at = [], 0
    for n in cuts:
        chunks.append(wire[at:at + n])
        at += n
    chunks.append(wire[at:])
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))
    parsed = [(sse.event, sse.data) for sse in EventSource(response).iter_sse()]
    assert parsed == [(name or "message", data) for name, data in events]


@SETTINGS
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.integers(1, 9))
def test_the_sdk_reads_a_step_stream_under_any_chunking(masked: list[int], chunk: int) -> None:
    steps = [StepEvent(step=i, steps=len(masked), masked=m, text="_" * m,
                           committed=[CommittedToken(position=i, id=i, text="\u00e9")]) for i, m in enumerate(masked)]
    wire = b"".join(ServerSentEvent(data=s.model_dump_json(), event="step", sep=SEP).encode() for s in steps)
    pieces = [wire[i:i + chunk] for i in range(0, len(wire), chunk)]
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(pieces))
    decoder = EventStream()
    got = [decoder.on_event(sse) for sse in EventSource(response).iter_sse()]
    assert all(isinstance(e, StepEvent) for e in got) and got == steps and not decoder.done
    assert np.array_equal([e.masked for e in got], masked)
