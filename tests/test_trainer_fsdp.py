"""training.strategy=fsdp on 2 CPU processes (gloo): full TZD checkpoints, and resume=auto on another number
of processes (2 -> 1 on one node, 1 -> 2 nodes through torchrun), each stage checked against DDP doing the
same training (both average the same per-rank gradients, so their weights and AdamW moments must agree)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from tests.conftest import ROOT, run_trainer
from trainer.checkpointing import STATE_FILE, keyed_by_name
from trainer.data import shakespeare_dir
from trainer.run import make_optimizer
from trainer.strategy import devices_per_node
from tzd.checkpoint import load_checkpoint
from tzd.models import ModelConfig, build_model
from tzd.tokenizer import train_tokenizer

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.context_len=32", "data=text",
        "training.batch_size=4", "training.lr=3e-3", "training.warmup_steps=2", "training.eval_every=2",
        "training.eval_batches=1", "training.sample_every=2", "training.sample_tokens=8", "training.log_every=1",
        "training.checkpoint_every=0", "training.precision=32-true", "training.num_threads=1",
        "training.accelerator=cpu"]


@pytest.fixture(scope="module")
def common(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """TINY on a small corpus with a tokenizer trained once for the module."""
    work = tmp_path_factory.mktemp("fsdp_data")
    corpus = work / "corpus.txt"
    works = sorted(shakespeare_dir().glob("*_gut.txt"))[:2]
    corpus.write_text("".join(w.read_text(encoding="utf-8") for w in works)[:300_000], encoding="utf-8")
    train_tokenizer([corpus.read_text(encoding="utf-8")], 512, work / "tokenizer.model")
    return [*TINY, f"data.path={corpus}", f"tokenizer.path={work / 'tokenizer.model'}"]


def state(run: Path) -> dict:
    return torch.load(run / "last" / STATE_FILE, map_location="cpu", weights_only=False)


def assert_same_training(a: Path, b: Path) -> None:
    """Same step, weights and optimizer moments (up to float reduction order)."""
    sa, sb = state(a), state(b)
    assert sa["progress"]["step"] == sb["progress"]["step"]
    torch.testing.assert_close(sa["model"], sb["model"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sa["optimizer"]["state"], sb["optimizer"]["state"], rtol=1e-5, atol=1e-6)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def at_two(common: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Steps 1-2 on 2 processes (of max_steps=4): FSDP, and DDP as the reference."""
    work = tmp_path_factory.mktemp("fsdp_at_two")
    runs = {}
    for strategy in ("fsdp", "ddp"):
        runs[strategy] = work / strategy
        proc = run_trainer(*common, "training.max_steps=4", "training.stop_at_step=2", "training.devices=2",
                           f"training.strategy={strategy}", f"out_dir={runs[strategy]}")
        assert "2 process(es)" in proc.stdout
    return runs


@pytest.fixture(scope="module")
def at_one(at_two: dict[str, Path], common: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Steps 3-4 on 1 process, resumed from the 2-process runs: FSDP on one process, and a plain process."""
    work = tmp_path_factory.mktemp("fsdp_at_one")
    runs = {name: copy_run(at_two[name], work / name) for name in at_two}
    for name, strategy in (("fsdp", "fsdp"), ("ddp", "auto")):
        proc = run_trainer(*common, "training.max_steps=4", "training.resume=auto", "training.devices=1",
                           f"training.strategy={strategy}", f"out_dir={runs[name]}")
        assert f"resumed from {runs[name] / 'last'} at step 2" in proc.stdout
        assert "1 process(es)" in proc.stdout
    return runs


def test_fsdp_saves_a_full_tzd_checkpoint(at_two: dict[str, Path]) -> None:
    fsdp = at_two["fsdp"]
    assert_same_training(fsdp, at_two["ddp"])  # the shards were gathered whole, the optimizer's too
    loaded = load_checkpoint(fsdp / "last", device="cpu")
    meta = loaded.config["training"]
    assert meta["steps"] == 2 and meta["world_size"] == 2 and meta["config"]["training"]["strategy"] == "fsdp"
    weights = state(fsdp)["model"]
    fresh = build_model(loaded.model_config)
    assert set(weights) == set(fresh.state_dict())
    for name, tensor in loaded.model.state_dict().items():
        assert tensor.shape == fresh.state_dict()[name].shape and torch.equal(tensor, weights[name]), name
    assert (fsdp / "best" / "config.json").is_file()
    assert sum(1 for _ in open(fsdp / "logs" / "samples.jsonl")) == 2  # the sharded model sampled (rank 0 wrote)


def test_fsdp_run_resumes_on_one_process(at_one: dict[str, Path]) -> None:
    assert_same_training(at_one["fsdp"], at_one["ddp"])
    meta = load_checkpoint(at_one["fsdp"] / "last").config["training"]
    assert meta["steps"] == 4 and meta["world_size"] == 1
    assert meta["tokens_seen"] == 2 * 4 * 32 * 2 + 2 * 4 * 32 * 1  # steps 1-2 on two processes, 3-4 on one


def run_torchrun_two_nodes(*overrides: str, logs: Path, timeout: float = 600) -> list[str]:
    """The README's torchrun command for 2 nodes of 1 process each, both on this machine (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--master_addr=127.0.0.1", f"--master_port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    files = [open(logs / f"node{rank}.log", "w+") for rank in (0, 1)]
    procs = [subprocess.Popen([*launcher, f"--node_rank={rank}", "-m", "trainer", "training.num_nodes=2",
                               "training.devices=1", *overrides], stdout=files[rank], stderr=subprocess.STDOUT,
                              cwd=ROOT, env=env) for rank in (0, 1)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for f in files:
        f.seek(0)
        outputs.append(f.read())
        f.close()
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outputs)
    return outputs


def test_fsdp_resumes_on_two_nodes_through_torchrun(at_one: dict[str, Path], common: list[str],
                                                     tmp_path: Path) -> None:
    fsdp, ddp = copy_run(at_one["fsdp"], tmp_path / "fsdp"), copy_run(at_one["ddp"], tmp_path / "ddp")
    more = [*common, "training.max_steps=6", "training.resume=auto"]
    node0, _ = run_torchrun_two_nodes(*more, "training.strategy=fsdp", f"out_dir={fsdp}", logs=tmp_path)
    assert f"resumed from {fsdp / 'last'} at step 4" in node0 and "2 process(es)" in node0
    run_trainer(*more, "training.devices=2", "training.strategy=ddp", f"out_dir={ddp}")
    assert_same_training(fsdp, ddp)
    meta = load_checkpoint(fsdp / "last").config["training"]
    assert meta["steps"] == 6 and meta["world_size"] == 2


def test_training_state_keyed_by_position_is_renamed() -> None:
    """A training_state.pt from before sharding (optimizer.state_dict(): keyed by position) still resumes."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, context_len=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = make_optimizer(model, OmegaConf.create({"weight_decay": 0.1, "lr": 1e-3, "beta1": 0.9, "beta2": 0.95}))
    model(torch.randint(0, 64, (2, 16))).float().mean().backward()
    optimizer.step()
    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    renamed = keyed_by_name(optimizer.state_dict(), model, optimizer)
    assert renamed["param_groups"] == by_name["param_groups"]
    torch.testing.assert_close(renamed["state"], by_name["state"], rtol=0, atol=0)
    assert keyed_by_name(by_name, model, optimizer) is by_name


@pytest.mark.parametrize("devices,count", [(8, 8), ([0, 1], 2)])
def test_fsdp_world_size_from_devices(devices: object, count: int) -> None:
    assert devices_per_node(devices) == count


@pytest.mark.parametrize("devices", ["auto", -1, 0, True])
def test_fsdp_needs_a_device_count(devices: object) -> None:
    with pytest.raises(ValueError, match="training.devices"):
        devices_per_node(devices)
