"""BD3-LM's block-diffusion loss: the two-stream forward against a plain per-block loop, the noise process,
the dispatch on the model's attention kind, the context check of two-stream inputs, and the preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_OVERRIDES, run_trainer
from tzd.checkpoint import load_checkpoint
from tzd.diffusion import (
    EPS,
    block_diffusion_loss,
    block_forward_process,
    diffusion_loss,
    evaluate,
    training_loss,
    two_stream_logits,
)
from tzd.models import ForwardContext, ModelConfig, build_model

BACKENDS = ["smdm", "litgpt"]
MASK_ID = 4


def tiny(backend: str = "smdm", attention: str = "block_causal") -> ModelConfig:
    return ModelConfig(backend=backend, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       context_len=32, attention=attention, diffusion_block=4)


def per_block_loop_loss(model: torch.nn.Module, ids: torch.Tensor, noisy: torch.Tensor, masked: torch.Tensor,
                        p: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The same NELBO the naive way: per row and block b, one forward over the clean blocks < b followed
    by the noised block b (block-causal, the row's own layout), CE / p over b's masked positions."""
    total = torch.zeros(())
    for r in range(ids.shape[0]):
        for b in blocks[r].unique().tolist():
            cols = (blocks[r] == b).nonzero().flatten()
            start, end = int(cols[0]), int(cols[-1]) + 1
            x = torch.cat((ids[r, :start], noisy[r, start:end]))[None]
            logits = model(x, ForwardContext(block_ids=blocks[r:r + 1, :end]))[0, start:end]
            m = masked[r, start:end]
            ce = F.cross_entropy(logits[m], ids[r, start:end][m], reduction="none")
            total = total + (ce / p[r, start:end][m]).sum()
    return total / ids.numel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_stream_loss_equals_per_block_loop(backend: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(backend)).eval()
    ids = torch.randint(5, 97, (4, 22))
    seed = 7
    d = block_forward_process(ids, MASK_ID, 4, generator=torch.Generator().manual_seed(seed))
    assert d.masked.any() and (~d.masked).any()
    two_stream = diffusion_loss(two_stream_logits(model, ids, d.noisy, d.blocks), ids, d.masked, d.p)
    loop = per_block_loop_loss(model, ids, d.noisy, d.masked, d.p, d.blocks)
    assert torch.allclose(two_stream, loop, rtol=1e-5, atol=1e-5), (float(two_stream), float(loop))
    # the one-call loss and the trainer's dispatch draw the same noise from the same seed
    one_call = block_diffusion_loss(model, ids, MASK_ID, 4, generator=torch.Generator().manual_seed(seed))
    dispatched = training_loss(model, ids, MASK_ID, tiny(backend), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(one_call, two_stream) and torch.equal(dispatched, two_stream)


def test_two_stream_gradients_equal_per_block_loop() -> None:
    torch.manual_seed(1)
    model = build_model(tiny())
    ids = torch.randint(5, 97, (2, 13))
    d = block_forward_process(ids, MASK_ID, 4, generator=torch.Generator().manual_seed(3))
    grads = []
    for loss_of in (lambda: diffusion_loss(two_stream_logits(model, ids, d.noisy, d.blocks), ids, d.masked, d.p),
                    lambda: per_block_loop_loss(model, ids, d.noisy, d.masked, d.p, d.blocks)):
        model.zero_grad()
        loss_of().backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_block_noise_levels_follow_the_serving_layout() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (256, 96), generator=g)
    d = block_forward_process(ids, MASK_ID, 32, generator=g)
    assert torch.equal(d.noisy == MASK_ID, d.masked) and torch.equal(d.noisy[~d.masked], ids[~d.masked])
    assert d.p.min() >= EPS and d.p.max() <= 1
    step = d.blocks.diff(dim=1)
    assert ((step == 0) | (step == 1)).all() and (d.blocks[:, 0] == 0).all()  # contiguous blocks from 0
    starts = [[0] + ((step[r] == 1).nonzero().flatten() + 1).tolist() for r in range(ids.shape[0])]
    # a drawn prompt length P cuts blocks at 0, 32, ..., then at P: most rows have a start off the grid of 32
    assert sum(any(s % 32 for s in row) for row in starts) > 200
    for r, row in enumerate(starts):
        ends = row[1:] + [96]
        assert all(e - s <= 32 for s, e in zip(row, ends, strict=True))
        assert all(torch.all(d.p[r, s:e] == d.p[r, s]) for s, e in zip(row, ends, strict=True))  # one level per block
    first, second = d.p[:, 0], d.p[:, -1]  # two different blocks of each row: independent levels
    assert (first != second).float().mean() > 0.99
    assert abs(float(first.mean()) - 0.5) < 0.06
    frac = d.masked.float().mean()
    assert abs(float(frac - d.p.mean())) < 0.01


def test_bidirectional_loss_unchanged() -> None:
    """A bidirectional model's training loss is today's: one level per sequence, one forward of the ids."""
    torch.manual_seed(0)
    cfg = tiny(attention="bidirectional")
    model = build_model(cfg).eval()
    ids = torch.randint(5, 97, (3, 20))
    got = training_loss(model, ids, MASK_ID, cfg, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.rand(3, generator=g)
    p = ((1 - EPS) * t + EPS)[:, None].expand(3, 20)
    masked = torch.rand(3, 20, generator=g) < p
    logits = model(torch.where(masked, MASK_ID, ids))
    want = (F.cross_entropy(logits[masked], ids[masked], reduction="none") / p[masked]).sum() / ids.numel()
    assert torch.allclose(got, want, atol=1e-6)
    # the same weights read block-causally give another number: the dispatch looks at the attention kind
    bd = build_model(tiny()).eval()
    bd.load_state_dict(model.state_dict())
    assert not torch.allclose(training_loss(bd, ids, MASK_ID, tiny(), generator=torch.Generator().manual_seed(5)),
                              got)


def test_evaluate_is_the_block_bound_with_fixed_seeds() -> None:
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg)
    batches = [torch.randint(5, 97, (2, 24)) for _ in range(2)]
    a = evaluate(model, batches, MASK_ID, cfg, draws=2)
    assert a.nats_per_token == evaluate(model, batches, MASK_ID, cfg, draws=2).nats_per_token
    assert model.training  # restored
    with torch.no_grad():
        want = sum(float(block_diffusion_loss(model.eval(), ids, MASK_ID, 4,
                                              generator=torch.Generator().manual_seed(1234 + 1000 * i + d)))
                   for i, ids in enumerate(batches) for d in range(2)) / 4
    assert abs(a.nats_per_token - want) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_counts_positions_not_columns(backend: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(backend)).eval()  # context 32
    ids = torch.randint(5, 97, (1, 32))
    d = block_forward_process(ids, MASK_ID, 4, generator=torch.Generator().manual_seed(0))
    assert two_stream_logits(model, ids, d.noisy, d.blocks).shape == (1, 32, 97)  # 64 columns, positions < 32
    with pytest.raises(ValueError, match="33 tokens exceeds the context of 32"):
        model(torch.randint(5, 97, (1, 33)))
    with pytest.raises(ValueError, match="position 32 exceeds the context of 32"):
        model(ids[:, :4], ForwardContext(positions=torch.arange(29, 33)[None]))


def test_preset_trains_and_reloads_block_causal(tmp_path: Path) -> None:
    out = tmp_path / "bd"
    run_trainer("experiment=shakespeare-small-bd", *TINY_OVERRIDES, "model.diffusion_block=16",
                "training.max_steps=4", "training.eval_every=4", "training.precision=32-true",
                "training.num_threads=1", f"out_dir={out}")
    loaded = load_checkpoint(out / "last", device="cpu")
    cfg = loaded.model_config
    assert cfg.attention == "block_causal" and cfg.diffusion_block == 16 and cfg.context_len == 96
    meta = loaded.config["training"]
    assert meta["steps"] == 4 and meta["validation"]["val_nelbo"] > 0 and meta["validation"]["val_nats_per_char"] > 0
    ids = torch.randint(5, loaded.tokenizer.vocab_size, (1, 40))
    changed = ids.clone()
    changed[0, 20] = (ids[0, 20] + 1) % loaded.tokenizer.vocab_size
    with torch.no_grad():  # block-causal as reloaded: a token in block 1 leaves block 0's logits alone
        assert torch.equal(loaded.model(ids)[0, :16], loaded.model(changed)[0, :16])
