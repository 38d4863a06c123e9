"""Server pieces without HTTP: flags and TZD_* variables, stream text helpers, the wire schema's checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from clients.protocol import CompletionRequest, GenerateRequest, SamplingParams
from server.config import DEFAULT_CHECKPOINT, PACKAGE_ROOT, parse_config
from server.output import canvas_text, stable_prefix
from server.runtime import choose_precision, cpu_has_bf16, inference, load_runtime
from tests.server_utils import ROOT
from tzd.checkpoint import load_checkpoint


def test_flags_override_environment_override_defaults(tmp_path: Path) -> None:
    cfg = parse_config([], {})
    assert (cfg.port, cfg.max_batch_size, cfg.dtype, cfg.api_keys) == (8000, 16, "auto", ())
    assert cfg.checkpoint in (Path(DEFAULT_CHECKPOINT), PACKAGE_ROOT / DEFAULT_CHECKPOINT)
    env = {"TZD_PORT": "9001", "TZD_MAX_BATCH_SIZE": "4", "TZD_DTYPE": "bfloat16", "TZD_API_KEY": "a,b",
           "TZD_SHUTDOWN_TIMEOUT": "2.5", "TZD_DEVICE": "cpu", "TZD_THREADS": "1"}
    cfg = parse_config([], env)
    assert (cfg.port, cfg.max_batch_size, cfg.dtype, cfg.api_keys, cfg.shutdown_timeout, cfg.device, cfg.threads) == \
        (9001, 4, "bfloat16", ("a", "b"), 2.5, "cpu", 1)
    cfg = parse_config(["--port", "9002", "--api-key", "c"], env)
    assert (cfg.port, cfg.api_keys) == (9002, ("c",))
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk1\n\n k2 \n")
    assert parse_config(["--api-key-file", str(keys)], {}).api_keys == ("k1", "k2")
    assert parse_config([], {"TZD_API_KEY_FILE": str(keys)}).api_keys == ("k1", "k2")


@pytest.mark.parametrize(("argv", "env", "text"), [
    (["--port", "0"], {}, "--port"), (["--dtype", "fp8"], {}, "--dtype"), ([], {"TZD_MAX_QUEUE": "many"}, "TZD_MAX_QUEUE"),
    ([], {"TZD_DEVICE": "tpu"}, "TZD_DEVICE"), (["--api-key-file", "/nonexistent/keys"], {}, "--api-key-file"),
])
def test_bad_flags_exit_with_a_usage_error(argv: list[str], env: dict, text: str,
                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        parse_config(argv, env)
    assert e.value.code == 2 and text in capsys.readouterr().err


def test_stable_prefix_holds_back_partial_stop_strings_and_characters() -> None:
    assert stable_prefix("Hello wor", ["world"]) == "Hello "
    assert stable_prefix("Hello w", ["xyz"]) == "Hello w"
    assert stable_prefix("abc\ufffd", []) == "abc"
    assert stable_prefix("a EN", ["END!", "NX"]) == "a "  # the longest tail that may begin a stop string


def test_canvas_text_shows_each_masked_position(tiny_checkpoint: Path) -> None:
    tok = load_checkpoint(tiny_checkpoint, device="cpu").tokenizer
    ids = tok.encode("To be, or not to be")
    m = tok.mask_id
    canvas = [ids[0], m, m, *ids[3:5], m, *ids[6:]]
    want = tok.decode(ids[:1]) + "__" + tok.decode(ids[3:5]) + "_" + tok.decode(ids[6:])
    assert canvas_text(tok, canvas, m) == want
    assert canvas_text(tok, [m] * 3, m) == "___" and canvas_text(tok, ids, m) == tok.decode(ids)


def test_request_models_extend_sampling_params() -> None:
    g = GenerateRequest(prompt="x", max_tokens=8, stop="END", stream=True)
    assert g.sampling_params() == SamplingParams(max_tokens=8, stop=["END"])
    c = CompletionRequest(prompt=[[1, 2], [3]], max_tokens=4, steps=2, cache="prefix", n=2)
    assert c.prompts() == [[1, 2], [3]] and c.sampling_params().cache == "prefix"
    assert CompletionRequest(prompt=[5, 6]).prompts() == [[5, 6]]
    assert CompletionRequest(prompt="hi").prompts() == ["hi"]
    with pytest.raises(ValidationError, match="frequency_penalty"):
        CompletionRequest(prompt="x", frequency_penalty=0.5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        GenerateRequest(prompt="x", temprature=1)


def test_protocol_imports_without_torch() -> None:
    code = "import sys, clients.protocol; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_precision_auto_on_cpu_is_fp32_weights_under_bf16_autocast_where_the_cpu_has_bf16() -> None:
    cpu = torch.device("cpu")
    assert choose_precision(cpu, "auto") == (torch.float32, torch.bfloat16 if cpu_has_bf16() else None)
    assert choose_precision(cpu, "float32") == (torch.float32, None)
    assert choose_precision(cpu, "bfloat16") == (torch.bfloat16, None)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU runs no native bf16, so auto picks no autocast")
def test_auto_runtime_stores_linear_layers_in_bf16_and_matches_autocast_over_fp32(tiny_checkpoint: Path) -> None:
    rt = load_runtime(tiny_checkpoint, "cpu", "auto")
    linear = {n: p.dtype for n, p in rt.loaded.model.named_parameters() if n.endswith("wqkv.weight")}
    assert linear and set(linear.values()) == {torch.bfloat16}
    assert rt.loaded.model.tok_embeddings.weight.dtype == torch.float32
    assert rt.dtype_name == "float32+bfloat16-linear+autocast-bfloat16"
    # what autocast used to do over fp32 weights (cast each weight at each call) gives the same logits
    plain = load_checkpoint(tiny_checkpoint, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, plain.model_config.vocab_size, (2, 24))
    with inference(rt):
        want = plain.model(ids)
        got = rt.loaded.model(ids)
    assert torch.equal(got, want)
