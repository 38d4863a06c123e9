"""The CPU step's commit (numpy: rules.select_commits_host, the numpy argmax) chooses exactly what the
device rule (rules.select_commits, torch) chooses, ties, thresholds and entropy bounds included."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tzd.sampling.rules import argmax, schedule_count, select_commits, select_commits_host


@st.composite
def commit_inputs(draw: st.DrawFn) -> tuple:
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 33))
    n = rows * cols
    # few distinct values: many ties, which the order (stable, by position) must break the same way
    conf = draw(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), min_size=n, max_size=n))
    ent = draw(st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]), min_size=n, max_size=n))
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    steps_left = draw(st.lists(st.integers(1, 16), min_size=rows, max_size=rows))
    threshold = draw(st.lists(st.sampled_from([0.0, 0.25, 0.6, 0.9]), min_size=rows, max_size=rows))
    bound = draw(st.lists(st.sampled_from([0.0, 0.1, 0.15, 0.5, 2.0]), min_size=rows, max_size=rows))
    shape = (rows, cols)
    return (np.array(conf, dtype=np.float32).reshape(shape), np.array(ent, dtype=np.float32).reshape(shape),
            np.array(mask).reshape(shape), np.array(steps_left), np.array(threshold, dtype=np.float32),
            np.array(bound, dtype=np.float32), draw(st.booleans()), draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(commit_inputs())
def test_host_commit_is_the_device_rule(inputs: tuple) -> None:
    conf, ent, is_mask, steps_left, threshold, bound, use_threshold, use_entropy = inputs
    count = schedule_count(is_mask.sum(axis=1), steps_left)
    thr = threshold if use_threshold else np.zeros_like(threshold)
    want, _ = select_commits(torch.from_numpy(conf), torch.from_numpy(is_mask), torch.from_numpy(steps_left),
                             torch.from_numpy(thr), use_threshold, torch.from_numpy(count),
                             torch.from_numpy(ent) if use_entropy else None, torch.from_numpy(bound))
    got = select_commits_host(conf, is_mask, count, threshold if use_threshold else None,
                              ent if use_entropy else None, bound if use_entropy else None)
    assert np.array_equal(got, want.numpy())


def test_cpu_argmax_is_torch_argmax() -> None:
    """The numpy argmax the CPU step uses gives torch's indices: the first maximum, -inf rows, NaN."""
    g = torch.Generator().manual_seed(0)
    for shape in [(16, 32, 4096), (3, 5, 128), (2, 7, 96), (1, 1, 64)]:
        for _ in range(5):
            ties = torch.randint(-3, 3, shape, generator=g).float()  # many equal maxima per row
            assert torch.equal(argmax(ties), ties.argmax(dim=-1))
            x = torch.randn(shape, generator=g)
            x[..., 0] = float("-inf")
            x[0, 0] = float("-inf")  # a row of -inf only: index 0, as torch
            x[-1, -1, 3] = float("nan")  # a NaN is the maximum for both
            assert torch.equal(argmax(x), x.argmax(dim=-1))
            assert torch.equal(argmax(x.double()), x.double().argmax(dim=-1))
