"""`python -m server --quantization`: the real server on a quantized model reports it (/health, /v1/models,
tzd_model_weight_bytes) and generates what the quantized model does in process, a mixture of experts (its experts
quantized) too; bad values are usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import torch

from tests.hf_checkpoints import write_sdar_moe
from tests.server_utils import ROOT, ServerProcess, metrics
from tzd.checkpoint import load_checkpoint
from tzd.quant import QuantConfig, weight_bytes
from tzd.sampling import SamplingParams, generate


def test_quantized_server_reports_and_generates(tiny_checkpoint: Path, tmp_path: Path) -> None:
    quant = QuantConfig("int4", group_size=32, head=True)
    args = ("--quantization", "int4", "--quantization-group-size", "32", "--quantize-head", "on",
            "--dtype", "float32", "--max-batch-size", "2")
    with ServerProcess(tiny_checkpoint, *args, log_dir=tmp_path) as srv, httpx.Client(timeout=60) as c:
        health = c.get(f"{srv.url}/health").json()
        assert health["quantization"] == "int4-g32+head"
        [card] = c.get(f"{srv.url}/v1/models").json()["data"]
        assert card["quantization"] == "int4-g32+head"
        local = load_checkpoint(tiny_checkpoint, device="cpu", dtype=torch.float32, quantization=quant)
        float_bytes = weight_bytes(load_checkpoint(tiny_checkpoint, device="cpu").model)
        m = metrics(srv.url)
        assert m["tzd_model_weight_bytes"] == weight_bytes(local.model) < 0.3 * float_bytes
        assert 'quantization="int4-g32+head"' in next(k for k in m if k.startswith("tzd_model_info"))
        r = c.post(f"{srv.url}/generate", json={"prompt": "ROMEO.\n", "max_tokens": 16, "steps": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        ids = local.tokenizer.encode("ROMEO.\n")
        [want] = generate(local.model, [ids], SamplingParams(max_tokens=16, steps=16), local.mask_id,
                          eos_id=local.tokenizer.eos_id, tokenizer=local.tokenizer)
        assert r.json()["tokens"] == want.tokens


def test_quantized_moe_server_counts_the_experts(tmp_path: Path) -> None:
    """SDAR-MoE in its Hugging Face layout, int8: the bytes reported are those of the quantized experts."""
    path = write_sdar_moe(tmp_path / "sdar_moe", n_embd=64, moe_intermediate_size=64)
    args = ("--quantization", "int8", "--dtype", "float32", "--max-batch-size", "2")
    with ServerProcess(path, *args, log_dir=tmp_path) as srv, httpx.Client(timeout=60) as c:
        assert c.get(f"{srv.url}/health").json()["quantization"] == "int8"
        local = load_checkpoint(path, device="cpu", dtype=torch.float32, quantization="int8")
        float_model = load_checkpoint(path, device="cpu").model
        experts = sum(p.nbytes for name, p in float_model.named_parameters() if ".experts." in name)
        held = metrics(srv.url)["tzd_model_weight_bytes"]
        # int8 experts save ~0.74x of their fp32 bytes; float experts (only the small linear layers quantized) would
        # keep the total above this bound
        assert held == weight_bytes(local.model) < weight_bytes(float_model) - 0.7 * experts
        r = c.post(f"{srv.url}/generate", json={"prompt": "To be, or not", "max_tokens": 8, "steps": 8,
                                                "temperature": 0})
        assert r.status_code == 200, r.text
        [want] = generate(local.model, [local.tokenizer.encode("To be, or not")], SamplingParams(max_tokens=8, steps=8),
                          local.mask_id, eos_id=local.tokenizer.eos_ids, tokenizer=local.tokenizer)
        assert r.json()["tokens"] == want.tokens


def test_float_server_reports_no_quantization(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with ServerProcess(tiny_checkpoint, "--dtype", "float32", log_dir=tmp_path) as srv:
        assert httpx.get(f"{srv.url}/health").json()["quantization"] == "none"
        assert httpx.get(f"{srv.url}/v1/models").json()["data"][0]["quantization"] == "none"
        float_bytes = weight_bytes(load_checkpoint(tiny_checkpoint, device="cpu").model)
        assert metrics(srv.url)["tzd_model_weight_bytes"] == float_bytes


def run_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_bad_quantization_is_a_usage_error(tiny_checkpoint: Path) -> None:
    proc = run_server("--checkpoint", str(tiny_checkpoint), "--quantization", "int3")
    assert (proc.returncode == 2
            and "--quantization: Input should be 'int8', 'int4' or 'fp8'" in proc.stderr), proc.stderr
    proc = run_server("--checkpoint", str(tiny_checkpoint), "--quantization", "int4",
                      "--quantization-group-size", "48")
    assert proc.returncode == 2 and "--quantization-group-size" in proc.stderr, proc.stderr


def test_fp8_on_cpu_is_refused_before_serving(tiny_checkpoint: Path) -> None:
    proc = run_server("--checkpoint", str(tiny_checkpoint), "--quantization", "fp8", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: --quantization: quantization=fp8 needs a CUDA GPU of compute capability >= 8.9")
