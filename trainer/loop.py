"""The training loop: Lightning Fabric for devices, DDP and mixed precision; explicit steps otherwise.

train() sets the run up (trainer/run.py, then start_loop), then each step is: one optimizer step
(train_step), the side tasks that are due (log_if_due, side_tasks: logging, validation, samples; failures
recorded, never fatal, trainer/side_tasks.py), and the saves (save_if_due, trainer/checkpointing.py).
The end-of-run save happens whatever the side tasks did; finish() then reports any failure.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from trainer.checkpointing import save_run
from trainer.run import Run, setup_run
from trainer.samples import (
    NoRoomForSamples,
    SamplePlan,
    generate_samples,
    plan_samples,
    sample_prompts,
    write_samples,
)
from trainer.side_tasks import SideTasks
from trainer.strategy import is_sharded
from tzd.diffusion import evaluate, training_loss
from tzd.tasks.score import baseline_params, score_task

__all__ = ["lr_at", "step_generator", "train", "train_step"]


def lr_at(step: int, t: DictConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The RNG for one micro-batch, a pure function of (seed, step, rank): resume replays it exactly."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 257 + rank) * 64 + micro)


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # over the micro-batches, still on the device (read only when logged)
    lr: float
    grad_norm: torch.Tensor | None
    tokens: int  # trained on in this step, all ranks (task rows vary in length: this rank's count x ranks)


def train_step(run: Run) -> StepResult:
    """One optimizer step over training.grad_accum micro-batches; advances the run's progress."""
    t, fabric, model, optimizer = run.cfg.training, run.fabric, run.model, run.optimizer
    step = run.state["step"]
    lr = lr_at(step, t)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = 0.0, 0
    for micro in range(t.grad_accum):
        g = step_generator(t.seed, step, fabric.global_rank, micro)
        batch = run.train_windows.sample(t.batch_size, g)
        ids, prompt_len = batch if isinstance(batch, tuple) else (batch, None)
        tokens += ids.numel() * fabric.world_size
        with fabric.no_backward_sync(model, enabled=micro < t.grad_accum - 1):
            loss = training_loss(model, ids.to(fabric.device), run.tokenizer.mask_id, run.model_cfg, generator=g,
                                 prompt_len=prompt_len)
            fabric.backward(loss / t.grad_accum)
        loss_sum += loss.detach()
    grad_norm = fabric.clip_gradients(model, optimizer, max_norm=t.grad_clip) if t.grad_clip else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.state["step"] += 1
    run.state["tokens_seen"] += tokens
    return StepResult(loss_sum, lr, grad_norm, tokens)


class Throughput:
    """Training tokens/s since the last reading; the time of side tasks and saves is left out."""

    def __init__(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def leave_out(self, seconds: float) -> None:
        self.t0 += seconds

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / (now - self.t0)
        self.t0, self.tokens = now, 0
        return rate


def due(step: int, every: int, t: DictConfig) -> bool:
    return bool(every) and (step % every == 0 or step == t.max_steps)


def log_step(run: Run, result: StepResult, tok_s: float, bar: tqdm) -> None:
    loss = float(result.loss_sum) / run.cfg.training.grad_accum
    metrics = {"loss": loss, "lr": result.lr, "tokens_per_s": tok_s, "tokens_seen": run.state["tokens_seen"]}
    if result.grad_norm is not None:
        metrics["grad_norm"] = float(result.grad_norm)
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
    run.fabric.log_dict(metrics, step=run.state["step"])


def to_device(batch: torch.Tensor | tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor | tuple:
    return tuple(b.to(device) for b in batch) if isinstance(batch, tuple) else batch.to(device)


def run_eval(run: Run) -> dict[str, float]:
    res = evaluate(run.model, [to_device(b, run.fabric.device) for b in run.val_batches], run.tokenizer.mask_id,
                   run.model_cfg, draws=1 if run.model_cfg.causal else int(run.cfg.training.eval_draws))
    metrics = {run.main_metric: res.nats_per_token, "val_ppl_bound": res.perplexity_bound}
    if run.task is None:
        metrics["val_nats_per_char"] = res.nats_per_token / run.chars_per_token
    else:  # rank 0's figure on every rank: they must agree on whether to save a best checkpoint
        metrics["val_accuracy"] = run.fabric.broadcast(task_accuracy(run), src=0)
    return metrics


def task_accuracy(run: Run) -> float:
    """Exact-match accuracy of the LLaDA baseline sampler on data.accuracy_examples validation examples."""
    n = int(run.cfg.data.accuracy_examples)
    if not n or not run.fabric.is_global_zero and not is_sharded(run.fabric.strategy):
        return float("nan")
    was_training = run.model.training
    run.model.eval()
    with run.fabric.autocast():
        score = score_task(run.model, run.tokenizer, run.task, run.val_examples[:n],
                           baseline_params(run.task, model_block=run.model_cfg.denoise_block), batch_size=n)
    run.model.train(was_training)
    return score.accuracy


def validate(run: Run, side: SideTasks, bar: tqdm) -> dict[str, float] | None:
    """Validation figures (None if they failed), logged, and out_dir/best when they are the best yet."""
    step = run.state["step"]
    metrics = side.run("validation", step, run_eval, run)
    if metrics is None:
        return None
    side.run("validation logging", step, log_validation, run, metrics, bar)
    if improves(run.state, metrics, run.main_metric):
        run.state["best_val"] = metrics[run.main_metric]
        if not math.isnan(metrics.get("val_accuracy", math.nan)):
            run.state["best_accuracy"] = metrics["val_accuracy"]
        side.run("best checkpoint", step, save_run, run, "best", metrics)
    return metrics


def improves(state: dict, metrics: dict[str, float], main_metric: str) -> bool:
    """Whether `metrics` beat the best so far. A task model is judged by its task accuracy first (what it is
    for), the NELBO breaking ties: on addition the NELBO kept falling while accuracy fell from 0.75 to 0."""
    accuracy = metrics.get("val_accuracy", math.nan)
    if math.isnan(accuracy):
        return metrics[main_metric] < state["best_val"]
    best = state.get("best_accuracy", -1.0)
    return accuracy > best or (accuracy == best and metrics[main_metric] < state["best_val"])


def log_validation(run: Run, metrics: dict[str, float], bar: tqdm) -> None:
    run.fabric.log_dict(metrics, step=run.state["step"])
    if run.fabric.is_global_zero:
        bar.write(f"step {run.state['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def sample(run: Run, plan: SamplePlan, bar: tqdm) -> None:
    # Sharded, every forward is a collective: the other ranks run the same sampler for rank 0's samples (it
    # fails alike on every rank, or a rank left alone would wait in the collective)
    if not run.fabric.is_global_zero:
        generate_samples(run.model, run.tokenizer, plan, run.state["step"])
        return
    for row in write_samples(run.model, run.tokenizer, plan, run.state["step"], run.out_dir):
        bar.write(f"[sample T={row['temperature']}] {row['prompt']!r} -> {row['text']!r}")


def make_sample_plan(run: Run) -> SamplePlan | None:
    """The run's samples sized to the model, or None (sampling off, or no room: said in one line)."""
    t = run.cfg.training
    if not t.sample_every or run.model_cfg.causal:
        return None
    prompts = sample_prompts(run.corpus.val) if run.task is None else run.corpus.val[:2]
    tokens = int(t.sample_tokens) if run.task is None else run.task.max_tokens
    try:
        plan = plan_samples(prompts, run.tokenizer, tokens, run.model_cfg.context_len)
    except NoRoomForSamples as e:
        run.fabric.print(f"samples skipped: {e}")
        return None
    if plan.note:
        run.fabric.print(plan.note)
    return plan


def stop_step(t: DictConfig) -> int:
    """Where this invocation stops: training.stop_at_step (a partial run) or max_steps, whichever is first."""
    return min(int(t.stop_at_step) if t.get("stop_at_step") else t.max_steps, t.max_steps)


@dataclass
class Loop:
    """What the steps of one train() call share besides the run: side tasks, samples, progress, timing."""

    run: Run
    side: SideTasks
    plan: SamplePlan | None
    sharded: bool  # every forward then needs every rank: all ranks sample
    stop_at: int
    bar: tqdm
    throughput: Throughput
    last_metrics: dict[str, float]


def start_loop(run: Run) -> Loop:
    t, fabric = run.cfg.training, run.fabric
    return Loop(run=run, side=SideTasks(fabric.global_rank, fabric.world_size), plan=make_sample_plan(run),
                sharded=is_sharded(fabric.strategy), stop_at=stop_step(t),
                bar=tqdm(total=t.max_steps, initial=run.state["step"], disable=not fabric.is_global_zero,
                         dynamic_ncols=True),
                throughput=Throughput(), last_metrics={})


def log_if_due(loop: Loop, result: StepResult, step: int) -> None:
    """The step's metrics line (loss, lr, tokens/s since the last one) every training.log_every steps."""
    t = loop.run.cfg.training
    if due(step, t.log_every, t):
        loop.side.run("logging", step, log_step, loop.run, result, loop.throughput.read(), loop.bar)
    loop.bar.update(1)


def side_tasks(loop: Loop, step: int) -> None:
    """Validation and samples that are due after `step`; a failure is recorded, never raised."""
    run, side, t = loop.run, loop.side, loop.run.cfg.training
    if due(step, t.eval_every, t):
        loop.last_metrics = validate(run, side, loop.bar) or loop.last_metrics
    if loop.plan is not None and (run.fabric.is_global_zero or loop.sharded) and due(step, t.sample_every, t):
        side.run("samples", step, sample, run, loop.plan, loop.bar)
    if side.failed:
        run.model.train()  # a side task that raised half-way may have left the model in eval mode


def save_if_due(loop: Loop, step: int) -> None:
    """out_dir/last every training.checkpoint_every steps and at the stop step."""
    every = loop.run.cfg.training.checkpoint_every
    if step >= loop.stop_at or (every and step % every == 0):
        save_run(loop.run, "last", loop.last_metrics)


def finish(loop: Loop) -> Path:
    """Close the loggers; raise SideTaskError (the last checkpoint is saved by then) if a side task failed."""
    loop.bar.close()
    run = loop.run
    for logger in run.fabric.loggers:
        loop.side.run("logging", run.state["step"], logger.finalize, "success")
    loop.side.raise_if_failed(run.out_dir / "last")
    return run.out_dir / "last"


def train(cfg: DictConfig) -> Path:
    """Train per `cfg`; returns the directory of the last checkpoint.

    Raises SideTaskError after the last checkpoint is saved when a side task failed on the way.
    """
    run = setup_run(cfg)
    loop = start_loop(run)
    while run.state["step"] < loop.stop_at:
        t0 = time.perf_counter()
        result = train_step(run)
        step = run.state["step"]
        loop.throughput.add(result.tokens)
        log_if_due(loop, result, step)
        t_side = time.perf_counter()
        side_tasks(loop, step)
        run.state["wall_time_s"] += time.perf_counter() - t0
        save_if_due(loop, step)
        loop.throughput.leave_out(time.perf_counter() - t_side)
    return finish(loop)
