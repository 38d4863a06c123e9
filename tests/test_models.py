"""Both backends: bidirectional, causal on request, same interface, save/reload gives identical logits."""

from __future__ import annotations

import pytest
import torch

from tzd.checkpoint import load_checkpoint, save_checkpoint
from tzd.models import ForwardContext, ModelConfig, build_model
from tzd.tokenizer import train_tokenizer

BACKENDS = ["smdm", "litgpt"]


def tiny(backend: str, **kw) -> ModelConfig:
    return ModelConfig(backend=backend, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       context_len=32, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional(backend: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(backend)).eval()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 97
    assert (model(ids)[:, 0] - model(changed)[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_flag_makes_left_to_right(backend: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(backend, causal=True)).eval()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 97
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_keys_are_ignored(backend: str) -> None:
    """seqlens masks the padded keys: a padded row gives the logits of the same row alone."""
    torch.manual_seed(0)
    model = build_model(tiny(backend)).eval()
    ids = torch.randint(0, 97, (1, 10))
    padded = torch.cat([ids, torch.randint(0, 97, (1, 6))], dim=1)
    out = model(padded, ForwardContext(seqlens=torch.tensor([10])))
    assert torch.allclose(out[:, :10], model(ids), atol=1e-5)


def test_context_overflow_is_a_clear_error() -> None:
    model = build_model(tiny("smdm"))
    with pytest.raises(ValueError, match="context of 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_reload_identical_logits(backend: str, tmp_path) -> None:
    tok = train_tokenizer(["To be, or not to be, that is the question.\n" * 50], 300, tmp_path / "t.model")
    torch.manual_seed(0)
    cfg = ModelConfig(backend=backend, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64, context_len=32)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model, cfg, tok.path, {"training": {"steps": 0}})
    loaded = load_checkpoint(tmp_path / "ckpt", device="cpu")
    ids = torch.randint(0, tok.vocab_size, (2, 20))
    assert torch.equal(loaded.model(ids), model(ids))
    assert loaded.mask_id == tok.mask_id and loaded.model_config == cfg


def test_config_reads_the_old_name_of_the_context_length() -> None:
    """`block_size` was the context length's key until it became `context_len` (the shipped models' config.json
    still say block_size): it reads as context_len; both at once must agree."""
    from tzd.models import ModelConfig

    assert ModelConfig.from_dict({"block_size": 96}).context_len == 96
    assert ModelConfig.from_dict({"block_size": 96, "context_len": 96}).context_len == 96
    with pytest.raises(ValueError, match="block_size=96 and context_len=64 disagree"):
        ModelConfig.from_dict({"block_size": 96, "context_len": 64})
    assert "block_size" not in ModelConfig().to_dict()
