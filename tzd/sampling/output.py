"""The output processor: one step's committed tokens (copied to the host once) into each request's
progress and its SlotStep event.

Vectorised over rows: the open offsets and the canvas copy, the EOS check (early exit); then per request
its counters, the next block when this one is done, and the event. Freeing a finished slot (its KV pages,
the prefix pool's bookkeeping) is the batch's: it owns those.
"""

from __future__ import annotations

import numpy as np

from tzd.sampling.rows import COLUMN
from tzd.sampling.slot import EARLY_EXIT, MAX_TOKENS, SlotStep, SlotTable
from tzd.sampling.step_plan import StepPlan


def process(step: StepPlan, committed: np.ndarray, table: SlotTable, eos_ids: np.ndarray,
            probs: np.ndarray | None = None,
            top: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[SlotStep]:
    """Events of `step` in its row order; `committed` [rows, P] as sample() returned it, on the host, with
    `probs` [rows, P] each token's probability and `top` (rows, ids, log-probs) the rows that asked for top
    alternatives (sampler.Commits): each event carries its commits' share."""
    c, host, offsets, slots = COLUMN, step.values.table, step.values.host_offsets, step.slots
    slot_of = host[:, c["slot"]]
    ri, ci = np.nonzero(committed >= 0)  # row-major: each row's commits in ascending offsets
    off = offsets[ri, ci]
    positions = (host[:, c["start"]] - host[:, c["prompt_len"]])[ri] + off  # from the first generated token
    tokens = committed[ri, ci]
    table.open[slot_of[ri], off] = False
    table.gen[slot_of[ri], positions] = tokens
    step_probs = probs[ri, ci] if probs is not None else np.ones(len(ri), dtype=np.float32)
    top_ids = top_lps = None
    if top is not None:  # the asking rows' alternatives, aligned with the commits (zeros for other rows)
        rows, ids, lps = top
        where = np.full(len(slots), -1)
        where[rows] = np.arange(len(rows))
        asked = where[ri] >= 0
        top_ids = np.zeros((len(ri), ids.shape[-1]), dtype=np.int64)
        top_lps = np.zeros((len(ri), ids.shape[-1]), dtype=np.float32)
        top_ids[asked], top_lps[asked] = ids[where[ri[asked]], ci[asked]], lps[where[ri[asked]], ci[asked]]
    counts = np.bincount(ri, minlength=len(slots))
    ends = np.cumsum(counts)
    G = int(host[:, MAX_TOKENS].max())
    canvas = table.gen[slot_of, :G]  # a copy: the events' canvases (mask ids past a row's max_tokens)
    eos, filled = np.zeros(len(slots), dtype=bool), np.zeros(len(slots), dtype=np.int64)
    if len(eos_ids):  # early exit: an EOS inside the fully committed left part ends the request
        is_mask = canvas == table.mask_id
        first_mask = np.where(is_mask.any(axis=1), is_mask.argmax(axis=1), G)
        at_eos = (canvas[..., None] == eos_ids).any(axis=-1) & (np.arange(G) < first_mask[:, None])  # np.isin sorts
        eos = at_eos.any(axis=1) & (host[:, EARLY_EXIT] != 0)
        # every position after that EOS is EOS (dInfer's early exit): the still-masked ones, all right of it
        # (everything left of it is committed), show its id; past a row's max_tokens stays masked
        if eos.any():
            fill = is_mask & eos[:, None] & (np.arange(G) < host[:, MAX_TOKENS, None])
            canvas = np.where(fill, canvas[np.arange(len(slots)), at_eos.argmax(axis=1)][:, None], canvas)
            filled = fill.sum(axis=1)
    events = []
    # host lists: a numpy scalar read per request costs more than the loop's own work
    forwards = np.where(host[:, c["cfg_scale"]] != 0, 2, 1).tolist()
    for i, s, n, end, stop, fw in zip(range(len(slots)), slots, counts.tolist(), ends.tolist(), eos.tolist(),
                                      forwards, strict=True):
        s.masked -= n
        s.steps_done += 1
        s.nfe += fw
        s.block_step += 1
        if s.masked and s.block_done():
            while s.block_done():  # the next block with masks (an infill's fixed text alone takes no step)
                s.block, s.block_step = s.block + 1, 0
            table.open_block(int(slot_of[i]))
        done = stop or s.masked == 0
        a = end - n
        p = s.plan
        ev = SlotStep(s.handle, s.steps_done - 1, p.steps, positions[a:end], tokens[a:end], s.masked,
                      canvas[i, :p.visible], s.nfe, done, ("stop" if stop else "length") if done else None,
                      probs=step_probs[a:end])
        k = p.params.top_logprobs
        if k and top_ids is not None:
            ev.top_ids, ev.top_logprobs = top_ids[a:end, :k], top_lps[a:end, :k]
        if p.visible < p.max_tokens:  # LLaDA2's canvas past the client's max_tokens: denoised, not shown
            _hide_tail(ev, p.visible, canvas[i, p.visible:p.max_tokens], table.mask_id, eos_ids)
        if stop and s.masked:  # ended before its plan did
            shown = int(fill[i, :p.visible].sum()) if p.visible < p.max_tokens else int(filled[i])
            ev.masked, ev.filled, ev.nfe_saved = 0, shown, s.planned_forwards_left()
        events.append(ev)
    return events


def _hide_tail(ev: SlotStep, visible: int, tail: np.ndarray, mask_id: int, eos_ids: np.ndarray) -> None:
    """The event as its client sees it: only commits and masked positions before `visible` (and an EOS
    past it does not make the visible part a "stop")."""
    keep = ev.positions < visible
    if not keep.all():
        ev.positions, ev.tokens = ev.positions[keep], ev.tokens[keep]
        ev.probs = ev.probs[keep] if ev.probs is not None else None
        if ev.top_ids is not None:
            ev.top_ids, ev.top_logprobs = ev.top_ids[keep], ev.top_logprobs[keep]
    ev.masked = max(ev.masked - int((tail == mask_id).sum()), 0)
    if ev.finish_reason == "stop" and not np.isin(ev.canvas, eos_ids).any():
        ev.finish_reason = "length"
