"""Bad checkpoints raise errors that name the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tzd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tzd.models import ModelConfig, build_model
from tzd.tokenizer import train_tokenizer


@pytest.fixture()
def ckpt(tmp_path):
    tok = train_tokenizer(["All the world's a stage, and all the men and women merely players.\n" * 40], 300,
                          tmp_path / "t.model")
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, context_len=16)
    return save_checkpoint(tmp_path / "ckpt", build_model(cfg), cfg, tok.path)


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.model"])
def test_missing_file(ckpt, name: str) -> None:
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(ckpt)


def test_truncated_weights(ckpt) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(ckpt)


def test_wrong_shapes(ckpt) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["n_embd"] = 64
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* has shape"):
        load_checkpoint(ckpt)


def test_unknown_format_version(ckpt) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["format_version"] = 99
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown format_version 99"):
        load_checkpoint(ckpt)


def test_atomic_overwrite_leaves_no_temporaries(ckpt) -> None:
    cfg = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text())["model"])
    save_checkpoint(ckpt, build_model(cfg), cfg, ckpt / "tokenizer.model", weights_dtype=torch.bfloat16)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt", "t.model"]
    loaded = load_checkpoint(ckpt)
    assert loaded.config["weights_dtype"] == "bfloat16"
    shutil.rmtree(ckpt)
