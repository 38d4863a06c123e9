"""What a training run sets up before its first step: devices, tokenizer, data, model, optimizer, resumed state."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from trainer.checkpointing import resolve_resume, restore_state
from trainer.data import Corpus, TokenWindows, encode_documents, load_corpus
from trainer.init_from import init_source, load_init_weights
from trainer.strategy import make_strategy
from trainer.task_data import TaskRows, encode_rows, load_task, task_corpus
from tzd.checkpoint import CheckpointError
from tzd.models import ModelConfig, build_model, count_params
from tzd.tasks import Task, TaskExample
from tzd.tokenizer import Tokenizer, train_tokenizer


@dataclass
class Run:
    """Everything the steps, side tasks and saves of one run share."""

    cfg: DictConfig
    out_dir: Path
    fabric: L.Fabric
    precision: str
    corpus: Corpus
    tok_path: Path
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    train_windows: TokenWindows | TaskRows  # random text windows, or a task's rows (data=task)
    val_batches: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]
    chars_per_token: float  # of the validation split: turns nats/token into nats/char
    model: torch.nn.Module  # as set up by Fabric
    optimizer: torch.optim.Optimizer
    n_params: int
    state: dict[str, Any]  # progress (step, tokens_seen, wall_time_s, best_val): saved and resumed
    task: Task | None = None  # data=task: the task, whose validation examples are also scored
    init_from: dict[str, Any] | None = None  # training.init_from: the checkpoint the weights started from
    val_examples: list[TaskExample] | None = None

    @property
    def main_metric(self) -> str:
        return "val_nll" if self.model_cfg.causal else "val_nelbo"



def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    on_cuda = accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


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


def launch_fabric(cfg: DictConfig, out_dir: Path, precision: str) -> L.Fabric:
    t = cfg.training
    for name in ("lightning.fabric", "lightning.pytorch.utilities.rank_zero"):  # Lightning's info lines
        logging.getLogger(name).setLevel(logging.WARNING)  # (our summary line says the precision)
    fabric = L.Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                      strategy=make_strategy(t), precision=precision, loggers=make_loggers(cfg, out_dir))
    fabric.launch()
    return fabric


def load_tokenizer(cfg: DictConfig, corpus: Corpus, out_dir: Path, resume_from: Path | None,
                   fabric: L.Fabric, init_from: Path | None = None) -> tuple[Path, Tokenizer]:
    """The resumed tokenizer, a given one, the init_from checkpoint's, or one trained on the training split
    by rank 0."""
    tok_path = out_dir / "tokenizer.model"
    if resume_from is not None:
        tok_path = resume_from / "tokenizer.model"
    elif init_from is not None and not cfg.tokenizer.path:
        tok_path = init_from / "tokenizer.model"
    elif cfg.tokenizer.path:
        tok_path = Path(str(cfg.tokenizer.path))
        if not tok_path.is_file():
            raise CheckpointError(f"tokenizer.path={tok_path}: no such file")
    elif fabric.is_global_zero:
        train_tokenizer(corpus.train, int(cfg.tokenizer.vocab_size), tok_path)
    fabric.barrier()
    return tok_path, Tokenizer(tok_path)


def setup_run(cfg: DictConfig) -> Run:
    """Launch the processes, then build (or resume) everything the first step needs."""
    t = cfg.training
    out_dir = Path(cfg.out_dir)
    resume_from = resolve_resume(cfg, out_dir)
    # a resumed run already started from init_from's weights: its own state wins
    init_from = init_source(str(t.init_from)) if t.get("init_from") and resume_from is None else None
    task = load_task(cfg.data) if cfg.data.name == "task" else None
    if task is not None:
        corpus, train_examples, val_examples = task_corpus(task, cfg.data)
    else:
        corpus, val_examples = load_corpus(cfg.data), None
    if t.num_threads:
        torch.set_num_threads(int(t.num_threads))
    precision = resolve_precision(str(t.precision), str(t.accelerator))
    fabric = launch_fabric(cfg, out_dir, precision)
    tok_path, tokenizer = load_tokenizer(cfg, corpus, out_dir, resume_from, fabric, init_from)

    model_cfg = ModelConfig.from_dict({**OmegaConf.to_container(cfg.model), "vocab_size": tokenizer.vocab_size})
    if task is not None:
        train_windows = encode_rows(tokenizer, train_examples, task.max_tokens, model_cfg.context_len,
                                    row_len=model_cfg.context_len)
        val_rows = encode_rows(tokenizer, val_examples, task.max_tokens, model_cfg.context_len)
        val_batches = val_rows.grid(t.batch_size, t.eval_batches)
        texts = [e.prompt + e.target for e in val_examples]
        chars_per_token = sum(map(len, texts)) / max(1, sum(map(len, tokenizer.encode_batch(texts))))
        val_tokens = int(val_rows.ids.numel())
    else:
        train_windows = TokenWindows(encode_documents(tokenizer, corpus.train), model_cfg.context_len, "train")
        val_windows = TokenWindows(encode_documents(tokenizer, corpus.val), model_cfg.context_len, "validation")
        val_chars = sum(len(d) for d in corpus.val) + len(corpus.val)  # +1 per document for its EOS
        val_batches = val_windows.grid(t.batch_size, t.eval_batches)
        chars_per_token = val_chars / len(val_windows.tokens)
        val_tokens = len(val_windows.tokens)
    train_tokens = int(train_windows.ids.numel()) if task is not None else len(train_windows.tokens)

    fabric.seed_everything(int(t.seed), verbose=False)  # the same initial weights on every run and rank
    with fabric.init_module():
        model = build_model(model_cfg)
    source = load_init_weights(model, init_from, asdict(model_cfg)) if init_from is not None else None
    n_params = count_params(model)  # on the plain module, before any wrapping or sharding
    # the optimizer after the model is set up: sharding (FSDP) replaces the parameters it must hold
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, t))
    run = Run(cfg=cfg, out_dir=out_dir, fabric=fabric, precision=precision, corpus=corpus, tok_path=tok_path,
              tokenizer=tokenizer, model_cfg=model_cfg, train_windows=train_windows, val_batches=val_batches,
              chars_per_token=chars_per_token, model=model, optimizer=optimizer, n_params=n_params,
              state={"step": 0, "tokens_seen": 0, "wall_time_s": 0.0, "best_val": float("inf")},
              task=task, val_examples=val_examples, init_from=source)
    if resume_from is not None:
        restore_state(run, resume_from)
        fabric.print(f"resumed from {resume_from} at step {run.state['step']}")
    elif source is not None:
        fabric.print(f"weights from {init_from} ({source['steps']} steps, {source['attention']}); "
                     "a new optimizer and schedule from step 0")
    fabric.print(f"{model_cfg.backend} model: {run.n_params / 1e6:.2f}M params, causal={model_cfg.causal}, "
                 f"{fabric.world_size} process(es), precision {precision}; {corpus.description}; "
                 f"{train_tokens:,} train tokens, {val_tokens:,} val tokens")
    return run
