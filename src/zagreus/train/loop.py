"""Pretraining: `zagreus pretrain RECIPE` on the trainer skeleton (zagreus.train.trainer).

What is pretraining's own: the model built on the meta device and turned into its distributed
form (`parallelize`: pipeline split -> TP -> AC -> compile -> FSDP2), the token loader over the
data stage's shards for this data-parallel rank, compute_loss (the chunked cross-entropy with
the output head fused in), validation loss and bits per byte on held-out shards, and MFU. The
loop, checkpoints, resume, the non-finite policy and SIGTERM are the trainer's. Under torchrun
(WORLD_SIZE > 1) torch.distributed is initialised and ranks agree through the mesh.

Periodic scoring with lm-eval (eval.quick_task) comes in as a callback from the command, so this
package never imports the eval stage.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from zagreus.data.loader import TokenLoader
from zagreus.devices import autocast, pick_device
from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.llama import materialize, meta_model
from zagreus.recipe import PretrainSection, Recipe, dump_recipe
from zagreus.rundir import RunDir
from zagreus.tokenizer import Tokenizer, load_tokenizer
from zagreus.train.losses import chunked_cross_entropy
from zagreus.train.metrics import bits_per_byte, measure_matmul_peak, text_bytes
from zagreus.train.optim import build_optimizer
from zagreus.train.parallel import ParallelDims, ParallelModel, build_mesh, parallelize, resolve_param_dtype
from zagreus.train.trainer import Evaluation, Settings, StepResult, Task, Trainer, TrainingDiverged, run_facts

log = logging.getLogger(__name__)

__all__ = ["run_pretrain", "compute_loss", "TrainingDiverged", "grad_accumulation", "init_distributed"]

# (model in memory, its tokenizer) -> scores, e.g. lm-eval on a small task (see train/commands.py).
QuickEval = Callable[[nn.Module, Tokenizer], dict[str, float]]


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


def _data_paths(recipe: Recipe, run: RunDir) -> tuple[Path, Path]:
    tokenizer_dir, data_dir = run.tokenizer, run.data
    if not (tokenizer_dir / "tokenizer.json").is_file() or not (data_dir / "train").is_dir():
        where = recipe.source_path or f"runs/{recipe.name}"
        raise UserError(f"{run.root}: no tokenized data ({tokenizer_dir}/tokenizer.json, {data_dir}/train/); "
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
    def evaluate(self, parallel: ParallelModel, chunk_tokens: int, world: int) -> dict[str, float]:
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
            with parallel.autocast():
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


class PretrainTask(Task):
    """One optimizer step of pretraining: `accum` micro-batches from the loader through the parallel model."""

    unit = "tokens"
    formats = {"mfu": "{:.1%}"}

    def __init__(self, parallel: ParallelModel, loader: TokenLoader, accum: int, device: torch.device,
                 tokens_per_step: int, flops_per_token: int, peak_flops: float, world: int):
        self.parallel, self.loader, self.accum, self.device = parallel, loader, accum, device
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops * world

    def step(self, step: int) -> StepResult:
        batches = [self.loader.next_batch() for _ in range(self.accum)]
        # Forward/backward of every micro-batch (pipelined when pp > 1); the loss comes back dp-averaged.
        loss = self.parallel.forward_backward([(b["input"].to(self.device, non_blocking=True),
                                                b["target"].to(self.device, non_blocking=True)) for b in batches])
        return StepResult(loss, self.tokens_per_step)

    def state(self) -> dict:
        tokens = self.loader.tokens_per_source()
        return {"tokens": sum(tokens.values()), "tokens_per_source": tokens, "loader": self.loader.state_dict()}

    def restore(self, meta: dict) -> None:
        self.loader.load_state_dict(meta["loader"])

    def throughput_stats(self, per_second: float, step: int) -> dict[str, float]:
        return {"mfu": self.flops_per_token * per_second / self.peak, "tokens": step * self.tokens_per_step}


def _model_config(recipe: Recipe, tokenizer: Tokenizer) -> ModelConfig:
    cfg = recipe.model.resolve(vocab_size=tokenizer.vocab_size).model_copy(
        update={"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})
    if recipe.pretrain.seq_len > cfg.max_seq_len:
        raise UserError(f"pretrain.seq_len {recipe.pretrain.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}; "
                        f"lower it or set model.overrides.max_seq_len")
    return cfg


def _parallel_model(cfg: ModelConfig, p: PretrainSection, dims: ParallelDims, accum: int,
                    device: torch.device) -> tuple[nn.Module, ParallelModel]:
    """(the plain model, its distributed form): pipeline split -> TP -> AC -> compile -> FSDP2.

    Built on the meta device and parallelised there; each rank then allocates and initialises
    only its own shard (the single-process weights, whatever the layout).
    """
    model = meta_model(cfg)
    par = p.parallel
    # compute_loss is looked up when called, so a test can wrap it.
    parallel = parallelize(model, dims, build_mesh(dims, device.type), device,
                           model_loss=lambda m, x, y: compute_loss(m, {"input": x, "target": y}, p.loss_chunk),
                           loss_parallel=par.loss_parallel, activation_checkpointing=p.activation_checkpointing,
                           compile=p.compile, param_dtype=resolve_param_dtype(par.param_dtype, device),
                           reduce_dtype=getattr(torch, par.reduce_dtype),
                           pp_schedule=par.pp_schedule, pp_microbatches=par.pp_microbatches,
                           local_batch=p.micro_batch * accum, autocast=lambda: autocast(device))
    materialize(model, device, seed=p.seed)
    return model, parallel


def _evaluations(recipe: Recipe, parallel: ParallelModel, validator: Validator | None, plain: nn.Module,
                 tokenizer: Tokenizer, quick_eval: QuickEval | None, world: int) -> list[Evaluation]:
    p, evaluations = recipe.pretrain, []
    if validator is not None:
        evaluations.append(Evaluation(p.eval_every, lambda step: validator.evaluate(parallel, p.loss_chunk, world),
                                      "validation"))
    task = recipe.eval.quick_task
    if task and quick_eval is not None:
        # The quick eval scores the plain module (the same parameters, no compile wrapper).
        evaluations.append(Evaluation(p.eval_every, lambda step: {
            f"{task}/{k}": float(v) for k, v in quick_eval(plain, tokenizer).items() if isinstance(v, (int, float))},
            task))
    return evaluations


def load_init_weights(recipe: Recipe, cfg: ModelConfig, model: nn.Module, whole: bool) -> None:
    """Continued pretraining: pretrain.init's weights into the (possibly sharded) model, in place.

    The starting model must have the recipe's shape, RoPE and norm epsilon (the recipe's model is
    the one trained); every rank reads the whole state and keeps its own shard of it. `whole`: the model
    holds every layer (False for a pipeline stage, which takes only its own).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from zagreus.checkpoint import MEANING_FIELDS, SHAPE_FIELDS, load_init

    path = recipe.resolve_path(recipe.pretrain.init)
    source, _ = load_init(path, "pretrain.init", lambda tok: cfg, recipe.model.describe(), SHAPE_FIELDS + MEANING_FIELDS)
    state = source.state_dict()
    if not whole:
        own = model.state_dict()
        state = {name: tensor for name, tensor in state.items() if name in own}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=whole))
    log.info("pretrain: step 0 starts from the weights of %s", path)


def run_pretrain(recipe: Recipe, quick_eval: QuickEval | None = None) -> dict:
    """Train (or resume) per recipe.pretrain in recipe.run_path(); returns the last metrics.

    quick_eval: scores the model in memory every pretrain.eval_every steps when eval.quick_task is
    set (single process only); `zagreus pretrain` passes lm-eval on that task.
    """
    p = recipe.pretrain
    run = RunDir(recipe.run_path())
    tokenizer_dir, data_dir = _data_paths(recipe, run)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    device = pick_device(p.device, int(os.environ.get("LOCAL_RANK", "0")))
    dinfo = init_distributed(device.type)
    cfg = _model_config(recipe, tokenizer)
    if dinfo.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        run.recipe.write_text(dump_recipe(recipe), encoding="utf-8")
    if recipe.eval.quick_task and dinfo.world > 1:
        raise UserError("eval.quick_task runs in single-process pretraining only; remove it and score checkpoints "
                        "with `zagreus eval RUN_DIR --every-checkpoint` instead")

    torch.manual_seed(p.seed)
    par = p.parallel
    dims = ParallelDims.resolve(par.dp_replicate, par.dp_shard, par.tp, par.pp, world_size=dinfo.world)
    dims.check_model(cfg, p.seq_len)
    accum = grad_accumulation(p, dims.dp)
    plain, parallel = _parallel_model(cfg, p, dims, accum, device)
    optimizer = build_optimizer(parallel.model, p.optimizer)
    weights = _source_weights(recipe)
    loader = TokenLoader(data_dir, "train", p.seq_len, p.micro_batch, weights=weights, seed=p.seed,
                         rank=parallel.dp_rank, world=parallel.dp_world, identity=tokenizer.identity())
    validator = _build_validator(data_dir, p, tokenizer, weights, parallel.dp_rank, parallel.dp_world, device)
    if validator is not None and dims.pp > 1 and p.eval_batches % accum:
        # Validation goes through the pipeline in groups shaped like a training step.
        raise UserError(f"pretrain.eval_batches {p.eval_batches} is not a multiple of the {accum} accumulation steps, "
                        f"which pipeline parallelism needs; set eval_batches: {-(-p.eval_batches // accum) * accum}")

    tokens_per_step = p.seq_len * p.micro_batch * parallel.dp_world * accum
    peak = p.peak_flops or measure_matmul_peak(str(device) if device.type == "cuda" else "cpu")
    task = PretrainTask(parallel, loader, accum, device, tokens_per_step, cfg.flops_per_token(p.seq_len), peak,
                        dinfo.world)
    trainer = Trainer(task, parallel.model, optimizer, Settings.of("pretrain", p, p.steps), checkpoints=run.checkpoints,
                      metrics_dir=run.metrics_dir, device=device, world=dinfo.world, is_main=dinfo.is_main,
                      clip_grad_norm=parallel.clip_grad_norm_, meta=run_facts(cfg, recipe), tokenizer_dir=tokenizer_dir,
                      evaluations=_evaluations(recipe, parallel, validator, plain, tokenizer, quick_eval, dinfo.world))
    step = trainer.resume()
    if step == 0 and p.init is not None:
        load_init_weights(recipe, cfg, parallel.model, dims.pp == 1)
    log.info("pretraining %s: %d parameters, %d steps x %d tokens (%d micro-steps of %d x %d per rank, %d rank(s)), "
             "device %s, starting at step %d", recipe.name, cfg.param_counts()["total"], p.steps, tokens_per_step,
             accum, p.micro_batch, p.seq_len, parallel.dp_world, device, step)
    return trainer.run()
