"""The trainer on a task (data=task), samples of block-diffusion models of any block, and init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_OVERRIDES, run_trainer
from tests.test_trainer import logged
from trainer.data import shakespeare_dir

TASK_TINY = ["experiment=addition-small", "model.n_layer=2", "model.n_embd=64", "training.batch_size=16",
             "training.max_steps=30", "training.eval_every=30", "training.sample_every=30", "training.num_threads=2",
             "training.precision=32-true", "training.resume=null", "data.train_examples=3000",
             "data.val_examples=64", "data.accuracy_examples=8", "training.log_every=10"]


def test_task_run_trains_scores_and_samples(tmp_path: Path) -> None:
    run_trainer(*TASK_TINY, f"out_dir={tmp_path}")
    acc = logged(tmp_path, "val_accuracy")
    assert list(acc) == [30] and 0.0 <= acc[30] <= 1.0
    assert 0 < logged(tmp_path, "val_nelbo")[30] < 6.0
    samples = [json.loads(line) for line in open(tmp_path / "logs" / "samples.jsonl")]
    assert samples and all(s["max_tokens"] == 64 and s["prompt"].endswith("\n") and "+" in s["prompt"]
                           for s in samples)
    meta = json.loads((tmp_path / "last" / "config.json").read_text())["training"]
    assert meta["data"].startswith("task addition") and meta["steps"] == 30


def test_task_canvas_too_small_is_named(tmp_path: Path) -> None:
    proc = run_trainer(*TASK_TINY, "data.max_tokens=20", f"out_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "data.max_tokens=20" in proc.stderr, proc.stderr


def _text_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text((shakespeare_dir() / "hamlet_gut.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return path


@pytest.mark.parametrize("block", [4, 16, 32])
def test_block_diffusion_samples_for_any_block(block: int, tmp_path: Path) -> None:
    """The issue's command: a block-causal run whose diffusion block is not 32 writes its samples."""
    out = tmp_path / "run"
    proc = run_trainer("model.attention=block_causal", f"model.diffusion_block={block}", "model.n_layer=2",
                       "model.n_head=2", "model.n_embd=64", "model.context_len=64", "tokenizer.vocab_size=512",
                       "data=text", f"data.path={_text_corpus(tmp_path)}", "training.max_steps=40",
                       "training.batch_size=8", "training.eval_every=0", "training.precision=32-true",
                       f"out_dir={out}", check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = [json.loads(line) for line in open(out / "logs" / "samples.jsonl")]
    assert {s["temperature"] for s in samples} == {0.5, 1.0} and all(s["step"] == 40 for s in samples)


def test_init_from_starts_from_the_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A bidirectional checkpoint fine-tuned as a block-diffusion model: with lr 0 the weights stay the
    source's exactly, the tokenizer is the source's, and the run records where it started."""
    out = tmp_path / "bd"
    run_trainer(*TINY_OVERRIDES, f"training.init_from={tiny_checkpoint}", "model.attention=block_causal",
                "model.diffusion_block=16", "training.lr=0", "training.max_steps=2", "training.eval_every=0",
                "training.precision=32-true", "training.save_dtype=float32", f"out_dir={out}")
    src, got = load_file(str(tiny_checkpoint / "model.safetensors")), load_file(str(out / "last" / "model.safetensors"))
    assert set(src) == set(got) and all(torch.equal(src[k].float(), got[k].float()) for k in src)
    assert (out / "last" / "tokenizer.model").read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    meta = json.loads((out / "last" / "config.json").read_text())
    assert meta["model"]["attention"] == "block_causal" and meta["model"]["diffusion_block"] == 16
    assert meta["training"]["init_from"]["path"] == str(tiny_checkpoint)
    assert meta["training"]["steps"] == 2  # its own schedule from step 0

    tuned = tmp_path / "tuned"  # and it learns from there: a real lr moves the weights
    run_trainer(*TINY_OVERRIDES, f"training.init_from={tiny_checkpoint}", "training.max_steps=3",
                "training.eval_every=0", "training.precision=32-true", f"out_dir={tuned}")
    moved = load_file(str(tuned / "last" / "model.safetensors"))
    assert any(not torch.equal(src[k].float(), moved[k].float()) for k in src)


def test_init_from_mismatch_names_the_tensor(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc = run_trainer(*TINY_OVERRIDES, f"training.init_from={tiny_checkpoint}", "model.n_embd=32",
                       "training.max_steps=1", f"out_dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "training.init_from=" in proc.stderr and "tensor " in proc.stderr and "model.n_embd=32 here" in proc.stderr
    proc = run_trainer(*TINY_OVERRIDES, f"training.init_from={tmp_path / 'nowhere'}", "training.max_steps=1",
                       f"out_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "training.init_from=" in proc.stderr and "not found" in proc.stderr


def test_an_experiments_out_dir_wins_over_the_default() -> None:
    from trainer.config import load_config

    assert load_config(["experiment=addition-small"]).out_dir == "runs/addition-small"
    assert load_config(["experiment=addition-small", "out_dir=elsewhere"]).out_dir == "elsewhere"
    assert load_config(["model=litgpt"]).out_dir == "runs/litgpt"


def test_task_rows_vary_in_length_and_validation_is_the_samplers_layout() -> None:
    from trainer.task_data import encode_rows
    from tzd.checkpoint import load_checkpoint
    from tzd.tasks import get_task

    tokenizer = load_checkpoint(Path("models/addition-small")).tokenizer
    task = get_task("addition")
    examples = task.examples("train", 200)
    train = encode_rows(tokenizer, examples, task.max_tokens, context=76, row_len=76)
    val = encode_rows(tokenizer, examples[:50], task.max_tokens, context=76)
    assert val.row_len == 10 + task.max_tokens  # the longest prompt + the canvas: what the sampler builds
    g = torch.Generator().manual_seed(0)
    lengths = set()
    for _ in range(40):
        ids, plen = train.sample(8, g)
        lengths.add(ids.shape[1])
        # every row keeps its whole target and an EOS after it
        assert ids.shape[1] >= int(train.need.max()) and torch.all(ids[:, -1] == tokenizer.eos_id)
        assert torch.equal(plen, torch.full_like(plen, 10))
    assert min(lengths) < val.row_len < max(lengths) <= 76 and len(lengths) > 10


def test_a_task_models_best_checkpoint_is_chosen_by_accuracy_first() -> None:
    from trainer.loop import improves

    state = {"best_val": 0.05, "best_accuracy": 0.75}
    assert not improves(state, {"val_nelbo": 0.01, "val_accuracy": 0.5}, "val_nelbo")  # lower NELBO, worse
    assert improves(state, {"val_nelbo": 0.09, "val_accuracy": 0.8}, "val_nelbo")
    assert improves(state, {"val_nelbo": 0.04, "val_accuracy": 0.75}, "val_nelbo")  # a tie: the NELBO
    assert not improves(state, {"val_nelbo": 0.06, "val_accuracy": 0.75}, "val_nelbo")
    assert improves({"best_val": 0.05}, {"val_nelbo": 0.04}, "val_nelbo")  # text models: the NELBO alone
    assert improves({"best_val": 0.05}, {"val_nelbo": 0.04, "val_accuracy": float("nan")}, "val_nelbo")


def test_a_block_causal_task_model_trains_and_scores(tmp_path: Path) -> None:
    run_trainer(*TASK_TINY, "model.attention=block_causal", "model.diffusion_block=16", "training.max_steps=10",
                "training.eval_every=10", "training.sample_every=10", f"out_dir={tmp_path}")
    assert 0 < logged(tmp_path, "val_nelbo")[10] < 6.0 and 0.0 <= logged(tmp_path, "val_accuracy")[10] <= 1.0
    samples = [json.loads(line) for line in open(tmp_path / "logs" / "samples.jsonl")]
    assert samples and all(s["max_tokens"] == 64 for s in samples)


def test_block_sft_loss_never_masks_the_prompt() -> None:
    from tzd.diffusion import block_sft_loss
    from tzd.models import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=40, context_len=24, n_layer=1, n_head=2, n_embd=32, attention="block_causal",
                      diffusion_block=4)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(5, 40, (3, 24))
    prompt_len = torch.tensor([3, 8, 5])
    seen = {}

    def spy(x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        seen["x"] = x
        return model(x, ctx)

    g = torch.Generator().manual_seed(1)
    loss = block_sft_loss(spy, ids, prompt_len, mask_id=4, block=4, generator=g)
    noisy = seen["x"][:, :24]
    assert torch.isfinite(loss) and loss > 0
    for b in range(3):  # the prompt is clean in both streams; the response has masked positions
        assert torch.equal(noisy[b, :prompt_len[b]], ids[b, :prompt_len[b]])
        assert (noisy[b, prompt_len[b]:] == 4).any()
    assert torch.equal(seen["x"][:, 24:], ids)
