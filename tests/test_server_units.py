"""Server pieces without HTTP: flags and TZD_* variables, stream text helpers, the wire schema's checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from clients.protocol import CompletionRequest, GenerateRequest, SamplingParams
from server.config import DEFAULT_CHECKPOINT, PACKAGE_ROOT, ServerConfig, parse_config
from server.keys import ApiKey, KeyFileError, KeyLimiter, KeyLimitExceeded, KeyLimits, read_key_file
from server.output import canvas_text, stable_prefix
from server.runtime import choose_precision, cpu_has_bf16, inference, load_runtime
from tests.server_utils import ROOT
from tzd.checkpoint import load_checkpoint
from tzd.models.invariant import is_batch_invariant


def test_flags_override_environment_override_defaults(tmp_path: Path) -> None:
    def keys(cfg: ServerConfig) -> tuple[str, ...]:
        return tuple(k.key for k in cfg.api_keys)

    cfg = parse_config([], {})
    assert (cfg.port, cfg.max_batch_size, cfg.dtype, keys(cfg)) == (8000, 16, "auto", ())
    assert cfg.checkpoint in (Path(DEFAULT_CHECKPOINT), PACKAGE_ROOT / DEFAULT_CHECKPOINT)
    env = {"TZD_PORT": "9001", "TZD_MAX_BATCH_SIZE": "4", "TZD_DTYPE": "bfloat16", "TZD_API_KEY": "a,b",
           "TZD_SHUTDOWN_TIMEOUT": "2.5", "TZD_DEVICE": "cpu", "TZD_THREADS": "1"}
    cfg = parse_config([], env)
    assert (cfg.port, cfg.max_batch_size, cfg.dtype, keys(cfg), cfg.shutdown_timeout, cfg.device, cfg.threads) == \
        (9001, 4, "bfloat16", ("a", "b"), 2.5, "cpu", 1)
    cfg = parse_config(["--port", "9002", "--api-key", "c"], env)
    assert (cfg.port, keys(cfg)) == (9002, ("c",))
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nk1\n\n k2 \n")
    assert keys(parse_config(["--api-key-file", str(key_file)], {})) == ("k1", "k2")
    assert keys(parse_config([], {"TZD_API_KEY_FILE": str(key_file)})) == ("k1", "k2")
    assert (cfg.deterministic, parse_config([], {"TZD_DETERMINISTIC": "on"}).deterministic) == ("off", "on")
    assert parse_config(["--deterministic", "off"], {"TZD_DETERMINISTIC": "on"}).deterministic == "off"


@pytest.mark.parametrize(("argv", "env", "text"), [
    (["--port", "0"], {}, "--port"), (["--dtype", "fp8"], {}, "--dtype"),
    ([], {"TZD_MAX_QUEUE": "many"}, "TZD_MAX_QUEUE"),
    ([], {"TZD_DEVICE": "tpu"}, "TZD_DEVICE"), (["--api-key-file", "/nonexistent/keys"], {}, "--api-key-file"),
    (["--deterministic", "yes"], {}, "--deterministic"),
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


def test_deterministic_runtime_runs_the_batch_invariant_path(tiny_checkpoint: Path) -> None:
    on, off = load_runtime(tiny_checkpoint, "cpu", "float32", deterministic=True), load_runtime(tiny_checkpoint, "cpu")
    assert is_batch_invariant(on.loaded.model) and not is_batch_invariant(off.loaded.model)
    assert "deterministic on" in on.describe() and "deterministic off" in off.describe()


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


def test_key_file_lines_and_their_errors(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\nsk-a name=team-a concurrency=4 rpm=120 tpm=5000\n\nsk-b rpm=3\nsk-c\n")
    a, b, c = read_key_file(f)
    assert (a.key, a.name, a.limits) == ("sk-a", "team-a", KeyLimits(4, 120, 5000))
    assert (b.key, b.limits) == ("sk-b", KeyLimits(rpm=3)) and b.name.startswith("key-") and "sk-b" not in repr(b)
    assert c.limits == KeyLimits()
    for text, where in [("sk-a rpm=0\n", "line 1: rpm must be a positive integer"),
                        ("ok\nsk-a burst=3\n", "line 2: unknown option 'burst'"),
                        ("sk-a rpm\n", "line 1: expected NAME=VALUE"), ("# nothing\n", "no keys"),
                        ("a name=x\nb name=x\n", "two keys named 'x'")]:
        f.write_text(text)
        with pytest.raises(KeyFileError, match=where):
            read_key_file(f)


def test_key_limiter_counts_a_sliding_minute() -> None:
    now = [1000.0]
    limiter = KeyLimiter(clock=lambda: now[0])
    key = ApiKey("k", "k", KeyLimits(concurrency=2, rpm=3, tpm=100))
    limiter.admit(key)
    limiter.admit(key)
    with pytest.raises(KeyLimitExceeded, match="concurrency=2") as e:
        limiter.admit(key)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"} and e.value.reason == "key_limit"
    limiter.release(key, 60)
    limiter.release(key, 50)  # 110 tokens in the minute: over tpm
    now[0] += 10
    with pytest.raises(KeyLimitExceeded, match="110 tokens in the last minute") as e:
        limiter.admit(key)
    assert e.value.code == "key_tpm_limit" and e.value.headers == {"Retry-After": "50"}  # the 60 age out at +60 s
    now[0] += 51
    for _ in range(3):  # both charges aged out, and the two starts: three new requests fit, one at a time
        limiter.admit(key)
        limiter.release(key, 0)
    with pytest.raises(KeyLimitExceeded, match="rpm=3") as e:
        limiter.admit(key)
    assert e.value.code == "key_rpm_limit" and e.value.headers == {"Retry-After": "60"}
