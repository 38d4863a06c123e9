"""The sampler: today's commit rules (rules.py) applied to one step's logits, on the device.

Per row: a token for every open position (argmax, or a seeded Gumbel-max draw after top-k/top-p), its
confidence (or seeded random remasking), then the positions the schedule (or a threshold, or an entropy
bound) commits. The committed tokens go into the device canvas; the result (with each token's probability,
and the top alternatives for the rows that asked) stays on the device until the output processor copies
it to the host in one copy: the step's one sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import kernels
from tzd.sampling import rules
from tzd.sampling.rows import COLUMN, RowValues, float_bits, upload
from tzd.sampling.slot import TOP_LOGPROBS


@dataclass
class Commits:
    """One step's commits, on the device until the output processor copies them (rows.download)."""

    tokens: torch.Tensor  # [rows, P] the committed id per open offset, -1 where none (padding included)
    probs: torch.Tensor  # [rows, P] float32: each chosen token's probability (its confidence at commit)
    # the rows that asked for top log-probabilities (SamplingParams.top_logprobs), their row indices on the
    # host, and the top-k (k the largest asked) ids and log-probabilities [len(top_rows), P, k] at each offset
    top_rows: np.ndarray
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def sample(logits: torch.Tensor, rv: RowValues, canvas: torch.Tensor, mask_id: int) -> Commits:
    """Commit this step's tokens into `canvas`; returns what was committed, with each token's probability
    and (for the rows that asked) the top alternatives, for every open offset."""
    table = rv.table
    # the open offsets are exactly the block's masked positions; padding columns read and write the
    # canvas's scratch column (no boolean indexing, a device sync, and no duplicates in the canvas)
    c = COLUMN  # flags from the host table: positive float64 bits order as the floats do
    sampling = bool(table[:, c["temperature"]].any())
    any_random = bool(table[:, c["random_remask"]].any())
    # a field is read only where a flag says some row needs it (on CPU each is made on its first read)
    if sampling:
        filtering = bool(table[:, c["top_k"]].any() or (table[:, c["top_p"]] < float_bits(1.0)).any())
        tokens = rules.choose_tokens(logits, rv.temperature, rv.top_k, rv.top_p, rv.seed, rv.steps_done,
                                     rv.positions, sampling, filtering)
    else:
        tokens = rules.argmax(logits)
    if any_random:
        conf, prob = rules.confidence(logits, tokens, rv.random_remask, rv.seed, rv.steps_done, rv.positions, True)
    else:
        conf = prob = rules.token_probability(logits, tokens)
    # entropy-bounded rows: each open position's predictive entropy (one more pass over [rows, P, V])
    entropy = rules.entropy(logits) if table[:, c["entropy_bound"]].any() else None
    if logits.device.type == "cpu":  # the host's own arrays: the choice and the commit in numpy
        committed = _commit_host(conf.numpy(), tokens.numpy(), entropy, rv, canvas, mask_id)
    else:
        pos = rv.positions
        any_threshold = bool(table[:, c["threshold"]].any())
        fused = kernels.commit_kernel(conf) if entropy is None else None
        if fused is not None:  # one launch instead of the rule's dozen ops (kernels/triton_commit.py)
            select = fused(conf, rv.offsets >= 0, rv.commits, rv.threshold if any_threshold else None)
        else:
            select, _ = rules.select_commits(conf, rv.offsets >= 0, rv.steps_left, rv.threshold, any_threshold,
                                             rv.commits, entropy, rv.entropy_bound)
        canvas.index_put_((rv.slot[:, None].expand_as(pos), pos), torch.where(select, tokens, mask_id))
        committed = torch.where(select, tokens, -1)
    out = Commits(committed, prob, np.flatnonzero(table[:, TOP_LOGPROBS]))
    if len(out.top_rows):  # only the rows that asked: the host table says which, no device value is read
        k = int(table[out.top_rows, TOP_LOGPROBS].max())
        rows = upload(out.top_rows.astype(np.int64), logits.device)
        out.top_ids, out.top_logprobs = rules.top_logprobs(logits[rows], k)
    return out


def _commit_host(conf: np.ndarray, tokens: np.ndarray, entropy: torch.Tensor | None, rv: RowValues,
                 canvas: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The CPU step's commit: select_commits_host on the host table's values, the committed tokens written
    into the canvas (a CPU tensor: its numpy view); returns the committed id per open offset, -1 elsewhere."""
    table, c = rv.table, COLUMN
    is_mask = rv.host_offsets >= 0
    threshold = table[:, c["threshold"]]
    threshold = threshold.view(np.float64).astype(np.float32) if threshold.any() else None
    bound = table[:, c["entropy_bound"]].view(np.float64).astype(np.float32) if entropy is not None else None
    select = rules.select_commits_host(conf, is_mask, table[:, c["commits"]], threshold,
                                       entropy.numpy() if entropy is not None else None, bound)
    canvas.numpy()[table[:, c["slot"], None], rv.positions.numpy()] = np.where(select, tokens, mask_id)
    return torch.from_numpy(np.where(select, tokens, -1))
