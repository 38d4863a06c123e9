"""The model runner: the step's forward passes, logits only where a block still has masks.

Two kinds of forward: rows that need the whole canvas (packed one after another when their lengths
differ, so a mixed batch costs the tokens it holds; padded to one length otherwise), and rows served
from the paged KV cache, which run only their query window (Slot.window) against the cached keys
(replayed from a CUDA graph where one is captured for the shape: cuda_graphs.py).
Classifier-free guidance runs each guided row's unconditional copy (prompt masked) in the same forward.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from tzd.models import ForwardContext, ModelConfig
from tzd.models.blocks import block_ids, token_block_ids
from tzd.sampling.cache import PackedRecordView, ReadView, RecordView
from tzd.sampling.cuda_graphs import WindowGraphs
from tzd.sampling.kv_pages import PagedKVStore
from tzd.sampling.rows import COLUMN, RowValues, upload
from tzd.sampling.slot import Slot
from tzd.sampling.step_plan import StepPlan


class ModelRunner:
    """Runs `model` over the batch's device canvas [slots, context + 1] (the last column is scratch:
    padding columns write there) with the keys/values in `kv`."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, canvas: torch.Tensor, kv: PagedKVStore,
                 mask_id: int) -> None:
        self.model, self.canvas, self.kv, self.mask_id = model, canvas, kv, mask_id
        self.device = canvas.device
        self.context = cfg.context_len
        self.block = cfg.denoise_block  # a block-causal model's blocks; None = bidirectional
        self.align = cfg.block_align
        self.shift = int(cfg.logit_shift)  # a cached window starts one column left of its block
        self.graphs: WindowGraphs | None = None  # captured cached forwards (DenoiseBatch's cuda_graphs)

    def logits(self, step: StepPlan) -> torch.Tensor:
        """fp32 logits [rows, P, V] at each row's open block offsets, in the plan's row order; the mask
        id is never a prediction."""
        parts = []
        if step.full:
            parts.append(self.full_logits(step.full_values, step.slots[:step.full]))
        if step.full < len(step.rows):
            parts.append(self.cached_logits(step.cached_values, step.slots[step.full:]))
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        logits = logits.float()  # fp32 once: argmax and softmax on bf16 are several times slower on CPU
        logits[..., self.mask_id] = float("-inf")
        return logits

    def full_logits(self, rv: RowValues, slots: list[Slot]) -> torch.Tensor:
        """Whole-canvas forward for these rows; logits at the open positions of each row's block [n, P, V]."""
        lengths = rv.table[:, COLUMN["total_len"]]
        if lengths.min() != lengths.max():
            return self.packed_logits(rv, slots)
        return self.padded_logits(rv, slots)

    def padded_logits(self, rv: RowValues, slots: list[Slot]) -> torch.Tensor:
        """full_logits with the rows padded to the longest (keys past a row's length masked)."""
        lengths = rv.table[:, COLUMN["total_len"]]
        L = int(lengths.max())
        ids = self.canvas[rv.slot, :L]
        seqlens = rv.total_len
        pos = rv.start[:, None] + rv.offsets.clamp(min=0)  # padding columns read the block's first position
        cfg_rows = np.flatnonzero(rv.table[:, COLUMN["cfg_scale"]].view(np.float64) > 0).tolist()
        if cfg_rows:  # unconditional copies with the prompt masked, in the same forward
            ci = upload(np.array(cfg_rows, dtype=np.int64), self.device)
            in_prompt = torch.arange(L, device=self.device)[None, :] < rv.prompt_len[ci][:, None]
            ids = torch.cat([ids, ids[ci].masked_fill(in_prompt, self.mask_id)])
            seqlens = torch.cat([seqlens, seqlens[ci]])
            pos = torch.cat([pos, pos[ci]])
        blocks = None
        if self.block is not None:  # block-causal: every row's own layout (its prompt is its leading span)
            prompt_len = rv.prompt_len if not cfg_rows else torch.cat([rv.prompt_len, rv.prompt_len[ci]])
            blocks = block_ids(L, prompt_len, self.block, align=self.align)
        if lengths.min() == L:
            seqlens = None  # no padding: attention takes its unmasked fast path
        record = any(s.cache_mode and not s.exact for s in slots)
        cache = RecordView(self.kv, rv.slot, seqlens, L) if record else None
        logits = self.model(ids, ForwardContext(seqlens=seqlens, cache=cache, output_positions=pos,
                                                block_ids=blocks))
        if cfg_rows:
            n, scale = len(slots), rv.cfg_scale[ci]
            cond, uncond = logits[ci], logits[n:]
            logits = logits[:n].index_copy(0, ci, uncond + (scale[:, None, None] + 1) * (cond - uncond))
        return logits

    def packed_logits(self, rv: RowValues, slots: list[Slot]) -> torch.Tensor:
        """full_logits for rows of different lengths: their tokens one after another in a single row
        (varlen attention), so the step costs the tokens the rows hold, not rows x the longest."""
        n = len(slots)
        order = np.array([*range(n), *(i for i, s in enumerate(slots) if s.plan.params.cfg_scale > 0)])
        lens = np.array([slots[i].plan.total_len for i in order], dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lens)])
        row = np.repeat(np.arange(len(order)), lens)  # packed row of each token
        host = np.concatenate([order[row], np.arange(cu[-1]) - cu[:-1][row], order, cu])
        table = upload(host, self.device)  # the packing's one host-to-device copy
        N, R = int(cu[-1]), len(order)
        src, pos = table[:N], table[N:2 * N]  # each token's batch row and position in its row
        rows, cu_t = table[2 * N:2 * N + R], table[2 * N + R:]
        ids = self.canvas[rv.slot[src], pos]
        if R > n:  # unconditional copies (classifier-free guidance) with the prompt masked
            uncond = (torch.arange(N, device=self.device) >= int(cu[n])) & (pos < rv.prompt_len[src])
            ids = ids.masked_fill(uncond, self.mask_id)
        blocks = None
        if self.block is not None:
            blocks = token_block_ids(pos, rv.prompt_len[src], self.block, self.align)[None]
        record = any(s.cache_mode and not s.exact for s in slots)
        cache = PackedRecordView(self.kv, rv.slot[src[:int(cu[n])]], pos[:int(cu[n])]) if record else None
        out = cu_t[:R, None] + rv.start[rows][:, None] + rv.offsets[rows].clamp(min=0)  # [R, P] flat indices
        ctx = ForwardContext(positions=pos[None], cache=cache, output_positions=out.reshape(1, -1),
                             block_ids=blocks, query_blocks=blocks, cu_seqlens=cu_t.int(), max_seqlen=int(lens.max()))
        logits = self.model(ids[None], ctx).view(R, out.shape[1], -1)
        if R > n:
            ci = rows[n:]
            scale = rv.cfg_scale[ci]
            cond, uncond_logits = logits[ci], logits[n:]
            logits = logits[:n].index_copy(0, ci, uncond_logits + (scale[:, None, None] + 1) * (cond - uncond_logits))
        return logits

    def cached_logits(self, rv: RowValues, slots: list[Slot]) -> torch.Tensor:
        """Forward of each row's query window only (Slot.window), keys from the cache."""
        windows = [s.window(self.shift) for s in slots]
        Q = max(w[1] for w in windows)
        offs = torch.arange(Q, device=self.device)
        positions = (rv.window_start[:, None] + offs).clamp(max=self.context - 1)
        ids = self.canvas[rv.slot[:, None], positions]
        # columns past a row's own window (a dual row beside prefix rows, a short last block) are padding
        kv_positions = torch.where(offs[None, :] < rv.query_len[:, None], positions, self.kv.scratch)
        lengths = [w[2] for w in windows]
        keys = max(lengths)
        opened = rv.offsets.clamp(min=0) + (rv.start - rv.window_start)[:, None]  # the block's columns
        blocks = (block_ids(self.context, rv.prompt_len, self.block, align=self.align)
                  if self.block is not None else None)
        write_index = self.kv.flat(rv.slot, kv_positions)
        if self.graphs is not None:
            keys_index = self.kv.flat(rv.slot, torch.arange(keys, device=self.device).expand(len(slots), -1))
            logits = self.graphs.run(ids, positions, write_index, keys_index, rv.key_len, blocks, opened)
            if logits is not None:
                return logits
        view = ReadView.of_rows(self.kv, rv.slot, write_index, keys, None if min(lengths) == keys else rv.key_len,
                                rv.table[:, COLUMN["slot"]])
        return self.model(ids, ForwardContext(positions=positions, seqlens=rv.key_len, cache=view,
                                              output_positions=opened, block_ids=blocks))
