"""The pretraining loop: `zagreus pretrain RECIPE`, single device, resumable, with seams for parallelism.

The loop is plain on purpose. The pieces a parallel run changes are separate functions:
build_model (meta device, then materialise and initialise), the one place the model is
wrapped (apply_wrappers; the parallelism helper inserts `parallelize(...)` there), the loader
built for (dp_rank, dp_world), and compute_loss(model, batch, chunk). Under torchrun
(WORLD_SIZE > 1) torch.distributed is initialised and gradients are averaged over ranks, so pure
data parallelism works without further changes.

Steps are counted as completed optimizer steps: checkpoint step-000100 holds the state after
100 updates, and the metrics record of step 100 gives the loss of the 100th update.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from zagreus.data.loader import TokenLoader
from zagreus.devices import pick_device
from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.llama import build_model
from zagreus.recipe import PretrainSection, Recipe, dump_recipe
from zagreus.tokenizer import load_tokenizer
from zagreus.checkpoint import load_checkpoint, save_checkpoint
from zagreus.rundir import latest_checkpoint, step_name
from zagreus.train.losses import chunked_cross_entropy
from zagreus.train.metrics import MetricsLogger, bits_per_byte, measure_matmul_peak, text_bytes
from zagreus.train.optim import build_optimizer, lr_multiplier
from zagreus.train.parallel import ParallelDims, ParallelModel, build_mesh, parallelize, resolve_param_dtype

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


# --- set-up ---------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """torch.distributed from torchrun's environment (gloo on CPU, nccl on CUDA); nothing for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def grad_accumulation(p: PretrainSection, dp_world: int) -> int:
    """Micro-steps per optimizer step: tokens_per_step / (seq_len x micro_batch x data-parallel ranks)."""
    per_micro = p.seq_len * p.micro_batch * dp_world
    if p.tokens_per_step is None:
        return 1
    if p.tokens_per_step % per_micro:
        raise UserError(f"pretrain.tokens_per_step {p.tokens_per_step} is not a multiple of seq_len x micro_batch x "
                        f"data-parallel ranks = {per_micro}; pick a multiple")
    return p.tokens_per_step // per_micro


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy of a micro-batch, the output projection fused into the chunked loss."""
    hidden = model(batch["input"], return_hidden=True)
    return chunked_cross_entropy(hidden, model.lm_head.weight, batch["target"], chunk_tokens)


def _data_paths(recipe: Recipe, run_dir: Path) -> tuple[Path, Path]:
    tokenizer_dir, data_dir = run_dir / "tokenizer", run_dir / "data"
    if not (tokenizer_dir / "tokenizer.json").is_file() or not (data_dir / "train").is_dir():
        where = recipe.source_path or f"runs/{recipe.name}"
        raise UserError(f"{run_dir}: no tokenized data ({tokenizer_dir}/tokenizer.json, {data_dir}/train/); "
                        f"run `zagreus data tokenize {where}` first")
    return tokenizer_dir, data_dir


def _source_weights(recipe: Recipe) -> dict[str, float] | None:
    if recipe.data is None:
        return None  # every source found in data/train, equally
    return {s.name: s.weight for s in recipe.data.sources}


# --- evaluation -----------------------------------------------------------------------------
class Validator:
    """Validation loss and bits per byte on a fixed set of held-out batches."""

    def __init__(self, data_dir: Path, p: PretrainSection, tokenizer, weights, dp_rank: int, dp_world: int,
                 device: torch.device):
        if weights is not None:  # a small source may have no held-out documents; validate on the others
            weights = {name: w for name, w in weights.items() if (data_dir / "val" / name).is_dir()} or None
        loader = TokenLoader(data_dir, "val", p.seq_len, p.micro_batch, weights=weights, seed=p.seed,
                             rank=dp_rank, world=dp_world, shuffle=False)
        self.batches = [loader.next_batch() for _ in range(p.eval_batches)]
        self.bytes = sum(text_bytes(tokenizer, b["target"].flatten().tolist()) for b in self.batches)
        self.device = device

    @torch.no_grad()
    def evaluate(self, parallel: ParallelModel, chunk_tokens: int, autocast, world: int) -> dict[str, float]:
        model = parallel.model
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes
        if parallel.model_loss is None:  # tensor / pipeline parallel: the sharded model or the last stage has the loss
            nats, tokens = parallel.eval_loss([(b["input"].to(self.device), b["target"].to(self.device))
                                               for b in self.batches])
            totals[0] += nats.double()
            totals[1] += tokens
        for batch in self.batches if parallel.model_loss is not None else []:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast():
                hidden = model(batch["input"], return_hidden=True)
                nats = chunked_cross_entropy(hidden, model.lm_head.weight, batch["target"], chunk_tokens, reduction="sum")
            totals[0] += nats.double()
            totals[1] += batch["target"].numel()
        totals[2] = self.bytes
        if world > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        model.train()
        nats, tokens, n_bytes = totals.tolist()
        return {"val_loss": nats / tokens, "val_bpb": bits_per_byte(nats, int(n_bytes))}


def _build_validator(data_dir: Path, p: PretrainSection, tokenizer, weights, dp_rank: int, dp_world: int,
                     device: torch.device) -> Validator | None:
    """The held-out split's validator, or None (with a warning) when the split is missing or too small."""
    if not any((data_dir / "val").glob("*/*.ds")):
        log.warning("%s/val: no held-out shards; validation loss and bits per byte are not computed", data_dir)
        return None
    try:
        return Validator(data_dir, p, tokenizer, weights, dp_rank, dp_world, device)
    except UserError as exc:
        log.warning("validation disabled: %s", exc)
        return None


def _quick_eval(model: nn.Module, tokenizer, recipe: Recipe) -> dict[str, float]:
    """eval.quick_task on the model in memory, leaving every random state as it was (exact resume)."""
    from zagreus.eval.run import quick_mc_eval

    e = recipe.eval
    data_dir = recipe.resolve_path(e.data_dir) if e.data_dir else None
    py_state, np_state = random.getstate(), np.random.get_state()
    # lm-eval seeds python, numpy and torch itself; fork_rng puts torch's generators back.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        scores = quick_mc_eval(model, tokenizer, e.quick_task, e.quick_limit, data_dir=data_dir,
                               num_fewshot=e.num_fewshot.get(e.quick_task, 0), batch_size=e.batch_size)
    random.setstate(py_state)
    np.random.set_state(np_state)
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}


# --- the loop -------------------------------------------------------------------------------
def run_pretrain(recipe: Recipe) -> dict:
    """Train (or resume) per recipe.pretrain in recipe.run_path(); returns the last metrics."""
    p = recipe.pretrain
    run_dir = recipe.run_path()
    tokenizer_dir, data_dir = _data_paths(recipe, run_dir)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    device = pick_device(p.device, int(os.environ.get("LOCAL_RANK", "0")))
    dinfo = init_distributed(device.type)
    cfg = recipe.model.resolve(vocab_size=tokenizer.vocab_size).model_copy(
        update={"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
    if p.seq_len > cfg.max_seq_len:
        raise UserError(f"pretrain.seq_len {p.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}; "
                        f"lower it or set model.overrides.max_seq_len")
    if dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")

    torch.manual_seed(p.seed)
    par = p.parallel
    dims = ParallelDims.resolve(par.dp_replicate, par.dp_shard, par.tp, par.pp, world_size=dinfo.world)
    dims.check_model(cfg, p.seq_len)
    accum = grad_accumulation(p, dims.dp)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    quick_task = recipe.eval.quick_task
    if quick_task and dinfo.world > 1:
        raise UserError("eval.quick_task runs in single-process pretraining only; remove it and score checkpoints "
                        "with `zagreus eval RUN_DIR --every-checkpoint` instead")
    model = build_model(cfg, device, seed=p.seed)
    unwrapped = model  # the quick eval scores the plain module (same parameters, no compile)
    # The one seam where the model is wrapped: pipeline split -> TP -> AC -> compile -> FSDP2.
    parallel = parallelize(model, dims, build_mesh(dims, device.type), device,
                           model_loss=lambda m, x, y: compute_loss(m, {"input": x, "target": y}, p.loss_chunk),
                           loss_parallel=par.loss_parallel, activation_checkpointing=p.activation_checkpointing,
                           compile=p.compile, param_dtype=resolve_param_dtype(par.param_dtype, device),
                           pp_schedule=par.pp_schedule, pp_microbatches=par.pp_microbatches,
                           local_batch=p.micro_batch * accum, autocast=autocast)
    model = parallel.model
    dp_rank, dp_world = parallel.dp_rank, parallel.dp_world
    optimizer = build_optimizer(model, p.optimizer)
    schedule = lr_multiplier(p.schedule, p.steps, p.optimizer.lr)
    weights = _source_weights(recipe)
    loader = TokenLoader(data_dir, "train", p.seq_len, p.micro_batch, weights=weights, seed=p.seed,
                         rank=dp_rank, world=dp_world, identity=tokenizer.identity())
    validator = _build_validator(data_dir, p, tokenizer, weights, dp_rank, dp_world, device)
    if validator is not None and dims.pp > 1 and p.eval_batches % accum:
        # Validation goes through the pipeline in groups shaped like a training step.
        raise UserError(f"pretrain.eval_batches {p.eval_batches} is not a multiple of the {accum} accumulation steps, "
                        f"which pipeline parallelism needs; set eval_batches: {-(-p.eval_batches // accum) * accum}")

    step, skipped_total = 0, 0
    ckpt_root = run_dir / "checkpoints"
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        meta, rank_state = load_checkpoint(resume_from, model, optimizer)
        step, skipped_total = meta["step"], meta.get("skipped_steps", 0)
        loader.load_state_dict(meta["loader"])
        if "torch_rng" in rank_state:
            torch.set_rng_state(rank_state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in rank_state:
            torch.cuda.set_rng_state(rank_state["cuda_rng"])
        log.info("resumed from %s (step %d, %d tokens)", resume_from, step, meta.get("tokens", 0))
    metrics = MetricsLogger(run_dir, enabled=dinfo.is_main, resume_step=step)

    def checkpoint(at: int) -> None:
        rank_state = {"torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            rank_state["cuda_rng"] = torch.cuda.get_rng_state()
        tokens = loader.tokens_per_source()
        meta = {"tokens": sum(tokens.values()), "tokens_per_source": tokens, "loader": loader.state_dict(),
                "skipped_steps": skipped_total, "model_config": cfg.model_dump(mode="json"),
                "tokenizer_dir": os.path.relpath(tokenizer_dir, ckpt_root / step_name(at)),
                "recipe": recipe.model_dump(mode="json", exclude={"source_path"})}
        save_checkpoint(ckpt_root, at, model, optimizer, meta, keep=p.checkpoint.keep, rank_state=rank_state)

    peak = p.peak_flops or measure_matmul_peak(str(device) if device.type == "cuda" else "cpu")
    flops_per_token = cfg.flops_per_token(p.seq_len)
    tokens_per_step = p.seq_len * p.micro_batch * dp_world * accum
    log.info("pretraining %s: %d parameters, %d steps x %d tokens (%d micro-steps of %d x %d per rank, %d rank(s)), "
             "device %s, starting at step %d", recipe.name, cfg.param_counts()["total"], p.steps, tokens_per_step,
             accum, p.micro_batch, p.seq_len, dp_world, device, step)

    bad_in_row, last = 0, {}
    window_time, window_tokens = 0.0, 0
    if step >= p.steps:
        log.info("%s: already trained for %d steps (pretrain.steps); raise it to train further", run_dir, step)
    model.train()
    stop = StopRequest()
    while step < p.steps:
        t0 = time.perf_counter()
        lr = p.optimizer.lr * schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [loader.next_batch() for _ in range(accum)]
        # Forward/backward of every micro-batch (pipelined when pp > 1); the loss comes back dp-averaged.
        loss = parallel.forward_backward([(b["input"].to(device, non_blocking=True), b["target"].to(device, non_blocking=True))
                                          for b in batches])
        grad_norm = parallel.clip_grad_norm_(p.optimizer.clip if p.optimizer.clip > 0 else math.inf)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            bad_in_row = 0
        else:
            skipped_total += 1
            bad_in_row += 1
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        window_time += time.perf_counter() - t0
        window_tokens += tokens_per_step

        if not finite:
            log.warning("step %d: non-finite %s, update skipped (%d in a row, %d in all)", step,
                        "loss" if not torch.isfinite(loss) else "gradient", bad_in_row, skipped_total)
            if bad_in_row >= p.max_bad_steps:
                metrics.log({"step": step, "loss": float(loss), "skipped_steps": skipped_total, "stopped": True})
                metrics.close()
                good = latest_checkpoint(run_dir)
                raise TrainingDiverged(
                    f"{bad_in_row} non-finite steps in a row (pretrain.max_bad_steps {p.max_bad_steps}) ending at step "
                    f"{step}; stopped. Last good checkpoint: {good or 'none'}; lower pretrain.optimizer.lr or raise warmup, "
                    f"then run `zagreus pretrain` again to resume from it")
        if step % p.log_every == 0 or step == p.steps:
            tok_s = window_tokens / max(window_time, 1e-9)
            last = {"step": step, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                    "mfu": flops_per_token * tok_s / (peak * dinfo.world), "tokens": step * tokens_per_step,
                    "skipped_steps": skipped_total}
            metrics.log(last, f"step {step}/{p.steps} | loss {last['loss']:.4f} | lr {lr:.2e} | grad norm "
                              f"{last['grad_norm']:.3f} | {tok_s:,.0f} tok/s | MFU {last['mfu']:.1%}")
            window_time, window_tokens = 0.0, 0
        if validator is not None and (step % p.eval_every == 0 or step == p.steps):
            val = validator.evaluate(parallel, p.loss_chunk, autocast, dinfo.world)
            metrics.log({"step": step, **val}, f"step {step} | val loss {val['val_loss']:.4f} | "
                                               f"val bits/byte {val['val_bpb']:.4f}")
            last.update(val)
        if quick_task and (step % p.eval_every == 0 or step == p.steps):
            scores = _quick_eval(unwrapped, tokenizer, recipe)
            metrics.log({"step": step, **{f"{quick_task}/{k}": v for k, v in scores.items()}},
                        f"step {step} | {quick_task} " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            last.update({f"{quick_task}/{k}": v for k, v in scores.items()})
        stopping = stop.agreed(device, dinfo.world)
        if bad_in_row == 0 and (step % p.checkpoint.every == 0 or step == p.steps or stopping):
            checkpoint(step)
        if stopping:
            log.warning("stopped by SIGTERM at step %d; run `zagreus pretrain` again to resume from its checkpoint", step)
            last["stopped_by_signal"] = True
            break
    stop.close()
    metrics.close()
    return last
