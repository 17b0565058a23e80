"""The trainer skeleton shared by pretraining, SFT and DPO.

One loop owns everything that is the same for every stage: the learning-rate schedule, clipping,
the non-finite policy (skip the update, stop after too many in a row with the last good
checkpoint intact), periodic evaluations, metrics (console, metrics.jsonl, TensorBoard),
checkpoints with exact resume (model, optimizer, RNG, the stage's data position), and SIGTERM
(finish the step in flight, save it on every rank, return). A stage hands it a `Task`: what one
optimizer step computes from its batches, and the data position to save. Nothing else differs.

Steps are counted as completed optimizer steps: checkpoint step-000100 holds the state after
100 updates, and the metrics record of step 100 gives the loss of the 100th update.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from zagreus.checkpoint import latest_intact_checkpoint, load_checkpoint, save_checkpoint
from zagreus.errors import UserError
from zagreus.rundir import latest_checkpoint, step_name
from zagreus.train.metrics import MetricsLogger
from zagreus.train.optim import lr_multiplier

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


class StopRequest:
    """SIGTERM (Slurm's requeue or time limit, torchrun forwarding it, a user's kill) asks the loop to
    save a checkpoint after the current step and return, instead of losing the steps since the last one."""

    def __init__(self) -> None:
        self.requested = False
        # Python delivers signals to the main thread only; a loop run from another thread keeps the default.
        in_main = threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(signal.SIGTERM, self._handle) if in_main else None

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM: finishing this step, saving a checkpoint, then stopping")
        self.requested = True

    def agreed(self, device: torch.device, world: int) -> bool:
        """True on every rank when any rank was signalled, so all of them save the same step."""
        if world == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class StepResult:
    """What one optimizer step of a task computed (its gradients are in .grad)."""

    loss: torch.Tensor  # the step's mean loss, the same value on every rank
    units: int  # work done, for the throughput (tokens, pairs)
    stats: dict[str, float] = field(default_factory=dict)  # the stage's own facts for the metrics record


class Task:
    """A stage's part of training: its batches and loss. Subclasses override `step`."""

    unit = "tokens"  # the throughput's unit: metrics get `<unit>_per_s`
    formats: dict[str, str] = {}  # console formats of the task's own facts, e.g. {"mfu": "{:.1%}"}

    def step(self, step: int) -> StepResult:
        """Forward and backward of optimizer step `step` (0-based), gradients accumulated into .grad."""
        raise NotImplementedError

    def state(self) -> dict:
        """JSON-able facts saved in meta.json with every checkpoint (the data position, token counts)."""
        return {}

    def restore(self, meta: dict) -> None:
        """Continue from the meta.json that `state` went into."""

    def throughput_stats(self, per_second: float, step: int) -> dict[str, float]:
        """Extra records computed from the throughput (MFU, tokens so far)."""
        return {}


@dataclass
class Evaluation:
    """A periodic evaluation: `run(step)` returns metrics, logged with `label` every `every` steps and at the end."""

    every: int
    run: Callable[[int], dict[str, float]]
    label: str


@dataclass
class Settings:
    """The loop's knobs, from a recipe section (`section` names it in messages: pretrain, sft, dpo)."""

    section: str
    steps: int
    lr: float
    schedule: Callable[[int], float]  # multiplier of lr at 0-based step s
    clip: float
    log_every: int
    checkpoint_every: int
    keep: int | None
    max_bad_steps: int
    permanent_every: int | None = None  # checkpoints at multiples of this step are never pruned

    @classmethod
    def of(cls, section: str, sec, steps: int) -> "Settings":
        """From a recipe section holding optimizer, schedule, log_every, checkpoint and max_bad_steps
        (pretrain, sft and dpo all do), for a run of `steps` optimizer steps."""
        opt = sec.optimizer
        return cls(section, steps, opt.lr, lr_multiplier(sec.schedule, steps, opt.lr), opt.clip, sec.log_every,
                   sec.checkpoint.every, sec.checkpoint.keep, sec.max_bad_steps, sec.checkpoint.permanent_every)


def run_facts(model_config, recipe, **extra) -> dict:
    """What every checkpoint of a stage records besides its training state: the model's shape (to
    rebuild it for loading), the recipe, and the stage's own facts."""
    return {"model_config": model_config.model_dump(mode="json"),
            "recipe": recipe.model_dump(mode="json", exclude={"source_path"}), **extra}


class Trainer:
    def __init__(self, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, settings: Settings, *,
                 checkpoints: Path, metrics_dir: Path, device: torch.device, world: int = 1, is_main: bool = True,
                 clip_grad_norm: Callable[[float], torch.Tensor] | None = None, meta: dict | None = None,
                 tokenizer_dir: Path | None = None, evaluations: list[Evaluation] | None = None):
        self.task, self.model, self.optimizer, self.s = task, model, optimizer, settings
        self.checkpoints, self.metrics_dir = Path(checkpoints), Path(metrics_dir)
        self.device, self.world, self.is_main = device, world, is_main
        self.clip_grad_norm = clip_grad_norm or self._clip_local
        self.meta = meta or {}  # the facts every checkpoint carries (model config, recipe)
        self.tokenizer_dir = tokenizer_dir
        self.evaluations = evaluations or []
        self.step = 0
        self.skipped_total = 0
        self.bad_in_row = 0

    def _clip_local(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    # --- checkpoints --------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest intact checkpoint under `checkpoints`, if any (damaged newer ones are set aside);
        returns the step to continue from."""
        latest = latest_intact_checkpoint(self.checkpoints)
        if latest is None:
            return 0
        meta, rank_state = load_checkpoint(latest, self.model, self.optimizer)
        self.step, self.skipped_total = meta["step"], meta.get("skipped_steps", 0)
        self.task.restore(meta)
        if "torch_rng" in rank_state:
            torch.set_rng_state(rank_state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in rank_state:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
        log.info("resumed from %s (step %d, %d tokens)", latest, self.step, meta.get("tokens", 0))
        return self.step

    def save(self) -> Path:
        rank_state = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            rank_state["cuda_rng"] = torch.cuda.get_rng_state()
        meta = {**self.task.state(), "skipped_steps": self.skipped_total, **self.meta}
        if self.tokenizer_dir is not None:  # relative to the checkpoint folder, so a moved run still loads
            meta["tokenizer_dir"] = os.path.relpath(self.tokenizer_dir, self.checkpoints / step_name(self.step))
        return save_checkpoint(self.checkpoints, self.step, self.model, self.optimizer, meta, keep=self.s.keep,
                               rank_state=rank_state, permanent_every=self.s.permanent_every)

    # --- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        """Train from self.step to settings.steps; returns the last metrics (with stopped_by_signal if so)."""
        s = self.s
        metrics = MetricsLogger(self.metrics_dir, enabled=self.is_main, resume_step=self.step)
        if self.step >= s.steps:
            log.info("already trained for %d steps (%s.steps); raise it to train further", self.step, s.section)
        self.model.train()
        stop = StopRequest()
        last: dict = {}
        window = [0.0, 0]  # seconds, units since the last log line
        try:
            while self.step < s.steps:
                result, grad_norm, lr, seconds = self._optimizer_step()
                window[0] += seconds
                window[1] += result.units
                finite = self.bad_in_row == 0
                if not finite:
                    self._on_nonfinite(result.loss, metrics)
                if self.step % s.log_every == 0 or self.step == s.steps:
                    last = self._log_step(metrics, result, grad_norm, lr, window)
                    window = [0.0, 0]
                for ev in self.evaluations:
                    if self.step % ev.every == 0 or self.step == s.steps:
                        last.update(self._evaluate(metrics, ev))
                stopping = stop.agreed(self.device, self.world)
                if finite and (self.step % s.checkpoint_every == 0 or self.step == s.steps or stopping):
                    self.save()
                if stopping:
                    log.warning("stopped by SIGTERM at step %d; run `zagreus %s` again to resume from its checkpoint",
                                self.step, s.section)
                    last["stopped_by_signal"] = True
                    break
        finally:
            stop.close()
            metrics.close()
        return last

    def _optimizer_step(self) -> tuple[StepResult, torch.Tensor, float, float]:
        t0 = time.perf_counter()
        lr = self.s.lr * self.s.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        result = self.task.step(self.step)
        grad_norm = self.clip_grad_norm(self.s.clip if self.s.clip > 0 else math.inf)
        if bool(torch.isfinite(result.loss)) and bool(torch.isfinite(grad_norm)):
            self.optimizer.step()
            self.bad_in_row = 0
        else:
            self.skipped_total += 1
            self.bad_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return result, grad_norm, lr, time.perf_counter() - t0

    def _on_nonfinite(self, loss: torch.Tensor, metrics: MetricsLogger) -> None:
        s = self.s
        log.warning("step %d: non-finite %s, update skipped (%d in a row, %d in all)", self.step,
                    "loss" if not torch.isfinite(loss) else "gradient", self.bad_in_row, self.skipped_total)
        if self.bad_in_row < s.max_bad_steps:
            return
        metrics.log({"step": self.step, "loss": float(loss), "skipped_steps": self.skipped_total, "stopped": True})
        good = latest_checkpoint(self.checkpoints)
        raise TrainingDiverged(
            f"{self.bad_in_row} non-finite steps in a row ({s.section}.max_bad_steps {s.max_bad_steps}) ending at step "
            f"{self.step}; stopped. Last good checkpoint: {good or 'none'}; lower {s.section}.optimizer.lr or raise "
            f"warmup, then run `zagreus {s.section}` again to resume from it")

    def _log_step(self, metrics: MetricsLogger, result: StepResult, grad_norm: torch.Tensor, lr: float,
                  window: list) -> dict:
        rate = window[1] / max(window[0], 1e-9)
        unit = self.task.unit
        derived = self.task.throughput_stats(rate, self.step)
        record = {"step": self.step, "loss": float(result.loss), "lr": lr, "grad_norm": float(grad_norm),
                  **result.stats, f"{unit}_per_s": rate, **derived, "skipped_steps": self.skipped_total}
        extras = "".join(f" | {k} {_fmt(v, self.task.formats.get(k))}" for k, v in {**result.stats, **derived}.items())
        metrics.log(record, f"{self.s.section} step {self.step}/{self.s.steps} | loss {record['loss']:.4f} | "
                            f"lr {lr:.2e} | grad norm {record['grad_norm']:.3f} | {rate:,.0f} {unit}/s{extras}")
        return record

    def _evaluate(self, metrics: MetricsLogger, ev: Evaluation) -> dict:
        # Evaluations may draw random numbers (lm-eval seeds python, numpy and torch itself); the
        # training run must not see it, or a resumed run would differ from an uninterrupted one.
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            scores = ev.run(self.step)
        random.setstate(py_state)
        np.random.set_state(np_state)
        metrics.log({"step": self.step, **scores},
                    f"step {self.step} | {ev.label} " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores


def _fmt(value, spec: str | None = None) -> str:
    if spec is not None:
        return spec.format(value)
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
