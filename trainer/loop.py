"""The training loop: Lightning Fabric for devices, DDP and mixed precision; explicit steps otherwise."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from trainer.data import TokenWindows, encode_documents, load_corpus
from tzd.checkpoint import CheckpointError, read_config, save_checkpoint
from tzd.diffusion import evaluate, training_loss
from tzd.models import ModelConfig, build_model, count_params
from tzd.tokenizer import Tokenizer, train_tokenizer

STATE_FILE = "training_state.pt"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_description(device: torch.device) -> str:
    """What the run ran on, for the checkpoint's metadata."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}")


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    on_cuda = accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def lr_at(step: int, t: DictConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The RNG for one micro-batch, a pure function of (seed, step, rank): resume replays it exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 257 + rank) * 64 + micro)


def make_optimizer(model: torch.nn.Module, t: DictConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def make_loggers(cfg: DictConfig, out_dir: Path) -> list[Any]:
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    kind = cfg.training.logger
    if kind == "csv":
        return [CSVLogger(root_dir=str(out_dir), name="logs")]  # logs/version_N: one per (resumed) run
    if kind == "tensorboard":
        return [TensorBoardLogger(root_dir=str(out_dir), name="logs")]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return [WandbLogger(save_dir=str(out_dir), project="tzd")]
    raise ValueError(f"training.logger={kind!r}: must be csv, tensorboard or wandb")


def resolve_resume(cfg: DictConfig, out_dir: Path) -> Path | None:
    resume = cfg.training.resume
    if resume in (None, "", "none"):
        return None
    path = out_dir / "last" if resume == "auto" else Path(str(resume))
    if resume == "auto" and not (path / STATE_FILE).is_file():
        return None  # nothing to resume yet: start fresh
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"training.resume={resume}: {path / STATE_FILE} not found")
    read_config(path)
    return path


def write_samples(model: torch.nn.Module, tokenizer: Tokenizer, step: int, cfg: DictConfig,
                  prompts: list[str], out_dir: Path) -> list[dict[str, Any]]:
    """Samples at temperatures 0.5 and 1.0 through the real sampler, appended to logs/samples.jsonl."""
    from tzd.sampling import SamplingParams, generate

    n = int(cfg.training.sample_tokens)
    rows = []
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    for temperature in (0.5, 1.0):
        params = SamplingParams(max_tokens=n, steps=n, block_length=min(32, n), temperature=temperature, seed=step)
        results = generate(model, prompt_ids, params, mask_id=tokenizer.mask_id)
        for prompt, res in zip(prompts, results, strict=True):
            rows.append({"step": step, "temperature": temperature, "prompt": prompt,
                         "text": tokenizer.decode(res.tokens)})
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "logs" / "samples.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def train(cfg: DictConfig) -> Path:
    """Train per `cfg`; returns the directory of the last checkpoint."""
    t = cfg.training
    out_dir = Path(cfg.out_dir)
    resume_from = resolve_resume(cfg, out_dir)
    corpus = load_corpus(cfg.data)
    if t.num_threads:
        torch.set_num_threads(int(t.num_threads))
    precision = resolve_precision(str(t.precision), str(t.accelerator))
    for name in ("lightning.fabric", "lightning.pytorch.utilities.rank_zero"):  # Lightning's info lines
        logging.getLogger(name).setLevel(logging.WARNING)  # (our summary line says the precision)
    fabric = L.Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                      precision=precision, loggers=make_loggers(cfg, out_dir))
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size

    # Tokenizer: the resumed one, a given one, or trained on the training split by rank 0.
    tok_path = out_dir / "tokenizer.model"
    if resume_from is not None:
        tok_path = resume_from / "tokenizer.model"
    elif cfg.tokenizer.path:
        tok_path = Path(str(cfg.tokenizer.path))
        if not tok_path.is_file():
            raise CheckpointError(f"tokenizer.path={tok_path}: no such file")
    elif fabric.is_global_zero:
        train_tokenizer(corpus.train, int(cfg.tokenizer.vocab_size), tok_path)
    fabric.barrier()
    tokenizer = Tokenizer(tok_path)

    model_cfg = ModelConfig(**OmegaConf.to_container(cfg.model), vocab_size=tokenizer.vocab_size)
    train_windows = TokenWindows(encode_documents(tokenizer, corpus.train), model_cfg.block_size, "train")
    val_windows = TokenWindows(encode_documents(tokenizer, corpus.val), model_cfg.block_size, "validation")
    val_chars = sum(len(d) for d in corpus.val) + len(corpus.val)  # +1 per document for its EOS
    chars_per_token = val_chars / len(val_windows.tokens)
    val_batches = val_windows.grid(t.batch_size, t.eval_batches)

    fabric.seed_everything(int(t.seed), verbose=False)  # the same initial weights on every run and rank
    with fabric.init_module():
        model = build_model(model_cfg)
    optimizer = make_optimizer(model, t)
    model, optimizer = fabric.setup(model, optimizer)
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "wall_time_s": 0.0, "best_val": float("inf")}
    if resume_from is not None:
        saved = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["progress"])
        torch.set_rng_state(saved["torch_rng"])
        fabric.print(f"resumed from {resume_from} at step {state['step']}")
    n_params = count_params(model)
    fabric.print(f"{model_cfg.backend} model: {n_params / 1e6:.2f}M params, causal={model_cfg.causal}, "
                 f"{world} process(es), precision {precision}; {corpus.description}; "
                 f"{len(train_windows.tokens):,} train tokens, {len(val_windows.tokens):,} val tokens")

    def run_eval() -> dict[str, float]:
        res = evaluate(model, [b.to(fabric.device) for b in val_batches], tokenizer.mask_id, model_cfg.causal,
                       draws=1 if model_cfg.causal else int(t.eval_draws))
        key = "val_nll" if model_cfg.causal else "val_nelbo"
        return {key: res.nats_per_token, "val_nats_per_char": res.nats_per_token / chars_per_token,
                "val_ppl_bound": res.perplexity_bound}

    def save(name: str, metrics: dict[str, float]) -> Path:
        meta = {
            "backend": model_cfg.backend,
            "training": {
                "steps": state["step"], "tokens_seen": state["tokens_seen"], "params": n_params,
                "wall_time_s": round(state["wall_time_s"], 1), "precision": precision, "world_size": world,
                "machine": machine_description(fabric.device),
                "data": corpus.description, "chars_per_token_val": round(chars_per_token, 4),
                "validation": metrics, "config": OmegaConf.to_container(cfg),
            },
        }
        extra = {STATE_FILE: {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                              "optimizer": optimizer.state_dict(), "progress": dict(state),
                              "torch_rng": torch.get_rng_state()}}
        path = out_dir / name
        if fabric.is_global_zero:
            dtype = getattr(torch, str(t.save_dtype))
            save_checkpoint(path, model, model_cfg, tok_path, meta, weights_dtype=dtype, extra_files=extra)
        fabric.barrier()
        return path

    tokens_per_step = t.batch_size * t.grad_accum * model_cfg.block_size * world
    stop_at = int(t.stop_at_step) if t.get("stop_at_step") else t.max_steps
    sample_prompts = [d[len(d) // 2:][:200].split("\n\n", 1)[-1][:80] for d in corpus.val[:2]]
    last_metrics: dict[str, float] = {}
    bar = tqdm(total=t.max_steps, initial=state["step"], disable=not fabric.is_global_zero, dynamic_ncols=True)
    window_t0, window_tokens = time.perf_counter(), 0
    while state["step"] < min(stop_at, t.max_steps):
        step = state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            g = step_generator(t.seed, step, rank, micro)
            ids = train_windows.sample(t.batch_size, g).to(fabric.device)
            with fabric.no_backward_sync(model, enabled=micro < t.grad_accum - 1):
                loss = training_loss(model, ids, tokenizer.mask_id, model_cfg.causal, generator=g)
                fabric.backward(loss / t.grad_accum)
            loss_sum += loss.detach()
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=t.grad_clip) if t.grad_clip else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens_seen"] += tokens_per_step
        window_tokens += tokens_per_step

        if state["step"] % t.log_every == 0 or state["step"] == t.max_steps:
            loss_val = float(loss_sum) / t.grad_accum
            tok_s = window_tokens / (time.perf_counter() - window_t0)
            window_t0, window_tokens = time.perf_counter(), 0
            metrics = {"loss": loss_val, "lr": lr, "tokens_per_s": tok_s, "tokens_seen": state["tokens_seen"]}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            fabric.log_dict(metrics, step=state["step"])
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        done = state["step"] >= min(stop_at, t.max_steps)
        t_side = time.perf_counter()  # evaluation, samples and saving do not count against tokens/s
        if t.eval_every and (state["step"] % t.eval_every == 0 or state["step"] == t.max_steps):
            last_metrics = run_eval()
            fabric.log_dict(last_metrics, step=state["step"])
            bar.write(f"step {state['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()))
            main_key = "val_nll" if model_cfg.causal else "val_nelbo"
            if last_metrics[main_key] < state["best_val"]:
                state["best_val"] = last_metrics[main_key]
                save("best", last_metrics)
        if (t.sample_every and not model_cfg.causal and fabric.is_global_zero
                and (state["step"] % t.sample_every == 0 or state["step"] == t.max_steps)):
            for row in write_samples(model, tokenizer, state["step"], cfg, sample_prompts, out_dir):
                bar.write(f"[sample T={row['temperature']}] {row['prompt']!r} -> {row['text']!r}")
        state["wall_time_s"] += time.perf_counter() - t0
        if done or (t.checkpoint_every and state["step"] % t.checkpoint_every == 0):
            save("last", last_metrics)
        window_t0 += time.perf_counter() - t_side
    bar.close()
    for logger in fabric.loggers:
        logger.finalize("success")
    return out_dir / "last"
