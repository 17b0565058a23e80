"""Data, tensor and pipeline parallelism on PyTorch's own distributed stack.

This module owns the device mesh and everything that turns a plain `Transformer` into its
distributed form; the training loop only sees a `ParallelModel` with `forward_backward`,
`clip_grad_norm_` and the data-parallel rank/world for its loader.

One DeviceMesh with four named dimensions, outermost first: ("pp", "dp_replicate",
"dp_shard", "tp"), plus "dp" = dp_replicate x dp_shard flattened (the loader's rank and the
loss average). tp is innermost so tensor-parallel collectives stay inside a node.

The order of composition is fixed, as in torchtitan, because each step wraps the previous:
    pipeline split -> TP -> activation checkpointing -> torch.compile -> FSDP2 / replicate
- Pipeline split first: a stage is the full model with the modules of other stages deleted
  (`Transformer` passes hidden states through when embed_tokens / norm / lm_head are None).
- TP next: `parallelize_module` must see plain nn.Linear / nn.Embedding / RMSNorm modules.
  Norms run sequence-parallel (activations sharded on the sequence between blocks, as
  DTensors so forward() sees the global sequence length for RoPE), and the output head
  keeps its logits sharded on the vocabulary for loss parallelism.
- AC wraps each block (its inputs are then the only saved activations of the block).
- compile then works per block on the wrapped module, so recompiles stay block-sized. (TP, AC
  and compile together are refused: torch 2.13 cannot compile a checkpointed region that saves
  DTensor metadata; compiling first and checkpointing the compiled block fails under FSDP.)
- FSDP2 last: it shards whatever parameters the previous steps produced (DTensors on the
  tp mesh included, giving 2D/3D layouts), one unit per block plus the root.

Each wrapper's torch.distributed module is imported where it is applied: a single-device run
(SFT, DPO, tests) loads none of them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.llama import Transformer

log = logging.getLogger(__name__)

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (model, inputs, targets) -> mean loss, for a loss that fuses the output head (unsharded models only).
ModelLossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


# --- layout ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every parallel dimension; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, tp: int, pp: int, world_size: int,
                where: str = "pretrain.parallel") -> "ParallelDims":
        """Fill dp_shard = -1 with the ranks left over and check the product against the world
        (`where` names the recipe section in messages)."""
        for name, value in (("dp_replicate", dp_replicate), ("tp", tp), ("pp", pp)):
            if value < 1:
                raise UserError(f"{where}.{name} is {value}; use 1 or more")
        if dp_shard == -1:
            rest = dp_replicate * tp * pp
            if world_size % rest:
                raise UserError(f"{where}: dp_replicate x tp x pp = {rest} does not divide the {world_size} processes "
                                f"(GPUs) of the job; use a multiple of {rest} processes or change the degrees")
            dp_shard = world_size // rest
        if dp_shard < 1:
            raise UserError(f"{where}.dp_shard is {dp_shard}; use 1 or more, or -1 for every rank left")
        dims = cls(dp_replicate, dp_shard, tp, pp)
        if dims.world_size != world_size:
            raise UserError(f"{where}: dp_replicate x dp_shard x tp x pp = {dims.world_size} but the job has "
                            f"{world_size} process(es) (GPUs); set dp_shard: -1 to take them all, or run "
                            f"{dims.world_size} processes (torchrun --nproc-per-node, zagreus slurm --nodes/--gpus-per-node)")
        return dims

    def check_features(self, activation_checkpointing: bool, compile: bool) -> None:
        """Combinations torch cannot run yet, refused before any work."""
        if self.tp > 1 and activation_checkpointing and compile:
            raise UserError("pretrain: tensor parallelism with both activation_checkpointing and compile fails in torch "
                            "2.13 (AOTAutograd cannot save DTensor metadata in a checkpointed region); set "
                            "activation_checkpointing: false or compile: false, or use dp_shard instead of tp")

    def check_model(self, cfg: ModelConfig, seq_len: int | None, where: str = "pretrain.parallel") -> None:
        """Shapes every degree must divide, checked before any process allocates anything (seq_len
        None: the batches are padded to a multiple of tp, as post-training's are)."""
        if self.tp > 1:
            for name, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads),
                                ("intermediate_size", cfg.intermediate_size), ("vocab_size", cfg.vocab_size),
                                ("hidden_size", cfg.hidden_size)):
                if value % self.tp:
                    raise UserError(f"{where}.tp = {self.tp} does not divide the model's {name} ({value}); "
                                    f"choose a tp that divides it (or 1)")
            if seq_len is not None and seq_len % self.tp:
                raise UserError(f"{where}.tp = {self.tp} does not divide pretrain.seq_len ({seq_len}), which sequence "
                                f"parallelism shards; pick a seq_len that is a multiple of tp")
        if self.pp > 1:
            if self.pp > cfg.n_layers:
                raise UserError(f"{where}.pp = {self.pp} is more than the model's {cfg.n_layers} layers; lower pp")
            if cfg.tie_embeddings:
                raise UserError(f"{where}.pp = {self.pp} with tied embeddings: the first and last pipeline stages "
                                f"cannot share one matrix; set model.overrides.tie_embeddings: false, or pp: 1 "
                                f"(use dp_shard / tp instead)")


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """The world's DeviceMesh with named dims, and "dp" flattened; None for one process."""
    if dims.world_size == 1:
        return None
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=MESH_DIMS)
    dp_mesh(mesh)
    return mesh


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """dp_replicate x dp_shard as one dimension (created once, then returned from the mesh's cache)."""
    return mesh["dp_replicate", "dp_shard"]._flatten("dp")


# --- pipeline split -------------------------------------------------------------------------
def stage_layers(n_layers: int, pp: int) -> list[range]:
    """Contiguous, balanced layer ranges, earlier stages taking the remainder."""
    base, extra = divmod(n_layers, pp)
    ranges, start = [], 0
    for s in range(pp):
        size = base + (1 if s < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def pipeline_microbatches(requested: int, pp: int, local_batch: int) -> int:
    """Pipeline micro-batches per step: `requested`, or by default as many as the pipeline has stages.

    local_batch: sequences one rank feeds the schedule per optimizer step (micro_batch x
    accumulation steps), which the schedule cuts into equal micro-batches.
    """
    n = requested or pp
    if n < pp:
        raise UserError(f"pretrain.parallel.pp_microbatches = {n} is fewer than pp = {pp}: the pipeline would idle; "
                        f"use at least {pp}")
    if local_batch % n:
        raise UserError(f"pretrain.parallel.pp_microbatches = {n} does not divide the {local_batch} sequences per rank "
                        f"and step (micro_batch x accumulation); pick a divisor of {local_batch}")
    return n


def split_stage(model: Transformer, stage: int, pp: int) -> Transformer:
    """Cut `model` in place down to pipeline stage `stage` of `pp` by deleting other stages' modules."""
    if pp == 1:
        return model
    if model.cfg.tie_embeddings:
        ParallelDims(pp=pp).check_model(model.cfg, seq_len=model.cfg.max_seq_len)
    keep = {str(i) for i in stage_layers(model.cfg.n_layers, pp)[stage]}
    for key in [k for k in model.layers if k not in keep]:
        del model.layers[key]
    if stage > 0:
        model.embed_tokens = None
    if stage < pp - 1:
        model.norm = None
        model.lm_head = None
    return model


# --- tensor parallel ------------------------------------------------------------------------
def apply_tp(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Megatron-style TP with sequence-parallel norms, on whatever stage `model` is."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tied = model.embed_tokens is not None and model.lm_head is not None and model.lm_head.weight is model.embed_tokens.weight
    top: dict = {}
    if model.embed_tokens is not None:
        # Rows (vocabulary) sharded; the partial sums are reduce-scattered onto the sequence.
        top["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False)
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.lm_head is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    if top:
        parallelize_module(model, tp_mesh, top)
    if tied:
        # Both matrices are [vocab, d] sharded on rows: re-share the one DTensor parameter.
        model.lm_head.weight = model.embed_tokens.weight

    # The residual stream stays a DTensor sharded on the sequence between blocks; attention and
    # MLP gather it (their extra positional args: cos, sin, mask, cache, layer index).
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None, None),
                                            use_local_output=True),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })

    # Pipeline stages exchange plain tensors: a later stage takes its local sequence shard back
    # as a DTensor, and a stage without the head hands its local shard on.
    if model.embed_tokens is None:
        parallelize_module(model, tp_mesh, PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                                              use_local_output=False))
    if model.lm_head is None:
        parallelize_module(model, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Shard(1),
                                                               use_local_output=True))


# --- activation checkpointing, compile, FSDP2 -----------------------------------------------
def apply_ac(model: Transformer) -> None:
    """Recompute each block in backward: only the block inputs stay in memory."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key in list(model.layers):
        model.layers[key] = checkpoint_wrapper(model.layers[key], preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    """Compile block by block, in place (parameter names unchanged): every block has one shape."""
    for block in model.layers.values():
        block.compile(dynamic=False)


def apply_data_parallel(model: Transformer, dims: ParallelDims, mesh: DeviceMesh, param_dtype: torch.dtype,
                        reduce_dtype: torch.dtype = torch.float32) -> None:
    """FSDP2 (HSDP when dp_replicate > 1) or, with dp_shard = 1, FSDP-style replication.

    The MixedPrecisionPolicy: parameters are kept (and optimised) in float32 and all-gathered
    as `param_dtype` for compute; gradients are reduced in `reduce_dtype` and handed to the
    optimizer in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # dp_shard = dp_replicate = 1 shards over a one-rank mesh: FSDP2 on a single GPU, which
    # benchmarks/gpu_check.py uses to run NCCL and the mixed-precision policy on one device.
    if dims.dp_shard > 1 or dims.dp_replicate == 1:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        # With pipelining every micro-batch would all-gather again: keep blocks unsharded.
        reshard = dims.pp == 1
        for block in model.layers.values():
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
        # The root (embedding, final norm, head) stays gathered after forward: backward needs it at
        # once, and a fused loss reads lm_head.weight outside forward (its grad is reduced at the
        # end of backward by FSDP's final callback).
        fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    else:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for block in model.layers.values():
            replicate(block, mesh=mesh["dp_replicate"], mp_policy=mp)
        replicate(model, mesh=mesh["dp_replicate"], mp_policy=mp)


# --- losses and gradients -------------------------------------------------------------------
def resolve_param_dtype(choice: str, device: torch.device) -> torch.dtype:
    """pretrain.parallel.param_dtype: "auto" computes in bfloat16 on CUDA, float32 on CPU (no native bf16)."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; with vocabulary-sharded DTensor logits it runs loss-parallel."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value as a plain tensor (a plain tensor unchanged)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global L2 gradient norm over DTensor and plain grads (summed over pipeline stages); clips in place."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    total = plain(total)
    if pp_group is not None:
        # Each stage holds different parameters: add the squares over stages.
        total = total.pow(2)
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


# --- the assembled model --------------------------------------------------------------------
class ParallelModel:
    """A model (or this rank's pipeline stage) in its distributed form, with one training step.

    `forward_backward(batches)` runs forward and backward over this rank's micro-batches
    (pipelined when pp > 1) and returns the loss averaged over the whole data-parallel batch,
    the same value on every rank; `eval_loss` is its forward-only twin.
    """

    def __init__(self, model: Transformer, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device,
                 loss_fn: LossFn = cross_entropy, model_loss: ModelLossFn | None = None, loss_parallel: bool = True,
                 pp_schedule: str = "1f1b", pp_microbatches: int = 0, local_batch: int | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model, self.dims, self.mesh, self.device = model, dims, mesh, device
        self.loss_fn, self.autocast = loss_fn, autocast
        # A fused (chunked) loss needs the whole output matrix and plain hidden states: no TP, no PP.
        self.model_loss = model_loss if dims.tp == 1 and dims.pp == 1 else None
        self.loss_parallel = loss_parallel and dims.tp > 1
        self.schedule = None
        self.n_microbatches = 0
        self._step_batch: int | None = None  # sequences per pipeline step; the stages' shapes follow it
        if dims.pp > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            if local_batch is None:
                raise ValueError("pipeline parallelism needs local_batch, the sequences per rank and step")
            self.n_microbatches = pipeline_microbatches(pp_microbatches, dims.pp, local_batch)
            stage = PipelineStage(model, self.pp_rank, dims.pp, device, group=mesh["pp"].get_group())
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[pp_schedule]
            self.schedule = cls(stage, n_microbatches=self.n_microbatches, loss_fn=loss_fn, scale_grads=True)

    # Ranks and stages ---------------------------------------------------------------------
    def _rank(self, dim: str) -> int:
        return self.mesh[dim].get_local_rank() if self.mesh is not None else 0

    @property
    def dp_rank(self) -> int:
        return dp_mesh(self.mesh).get_local_rank() if self.mesh is not None else 0

    @property
    def dp_world(self) -> int:
        return self.dims.dp

    @property
    def pp_rank(self) -> int:
        return self._rank("pp")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def loss_context(self) -> contextlib.AbstractContextManager:
        if not self.loss_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    # The step -----------------------------------------------------------------------------
    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            if self.model_loss is not None:
                return self.model_loss(self.model, inputs, targets)
            return self.loss_fn(self.model(inputs), targets)

    def forward_backward(self, batches: list[Batch]) -> torch.Tensor:
        """Gradients of this rank's micro-batches accumulate into .grad; returns the mean loss over
        the micro-batches of every data-parallel rank (the same value on every rank).

        Without pipelining each micro-batch runs forward and backward in turn (gradient
        accumulation); with it they are joined and the schedule cuts them into its micro-batches.
        """
        with self.loss_context():
            if self.schedule is None:
                total = torch.zeros((), device=self.device)
                for inputs, targets in batches:
                    loss = self._loss(inputs, targets)
                    (loss / len(batches)).backward()
                    total += plain(loss).detach().float()
                value = total / len(batches)
            else:
                inputs, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
                self._step_batch = len(inputs)
                with self.autocast():  # forward and backward interleave inside the schedule
                    value = self._pipeline(self.schedule.step, inputs, targets)
        return self._dp_mean(value)

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> tuple[torch.Tensor, int]:
        """(summed loss, tokens) of this rank's batches, forward only; equal on every rank of a dp group.

        With pipelining the batches are joined into groups of one training step's sequences
        (the stages' buffers have those shapes), so their count must be a multiple of it.
        """
        tokens = sum(y.numel() for _, y in batches)
        # Eager: torch 2.13's compiled blocks fail without grad on DTensors ("'Tensor' object has
        # no attribute 'elem'") after training graphs were built; validation is a small share.
        with self.loss_context(), torch.compiler.set_stance("force_eager"):
            if self.schedule is None:
                return torch.stack([plain(self._loss(x, y)).float() * y.numel() for x, y in batches]).sum(), tokens
            inputs, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            group = self._step_batch
            if group is None or len(inputs) % group:
                raise UserError(f"validation with pipeline parallelism runs in groups of one training step's "
                                f"{group} sequences per rank; make pretrain.eval_batches x micro_batch "
                                f"({len(inputs)}) a multiple of it")
            with self.autocast():
                means = [self._pipeline(self.schedule.eval, inputs[i:i + group], targets[i:i + group])
                         for i in range(0, len(inputs), group)]
            return torch.stack(means).sum() * targets[:group].numel(), tokens

    def _pipeline(self, run: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        if self.is_first_stage:
            run(inputs, target=targets if self.is_last_stage else None, losses=losses if self.is_last_stage else None)
        elif self.is_last_stage:
            run(target=targets, losses=losses)
        else:
            run()
        value = torch.stack([plain(x).detach().float() for x in losses]).mean() if losses else torch.zeros((), device=self.device)
        # Only the last stage knows the loss: the sum over stages hands it to every rank.
        dist.all_reduce(value, group=self.mesh["pp"].get_group())
        return value

    def _dp_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.dims.dp == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, group=dp_mesh(self.mesh).get_group())  # gloo has no AVG
        return value / self.dims.dp

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        return clip_grad_norm_(list(self.model.parameters()), max_norm, pp_group)


def parallelize(model: Transformer, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device, *,
                loss_fn: LossFn = cross_entropy, model_loss: ModelLossFn | None = None, loss_parallel: bool = True,
                activation_checkpointing: bool = False, compile: bool = False, param_dtype: torch.dtype = torch.float32,
                reduce_dtype: torch.dtype = torch.float32, pp_schedule: str = "1f1b", pp_microbatches: int = 0,
                local_batch: int | None = None,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> ParallelModel:
    """Turn a whole model into this rank's distributed part, in place.

    The model is normally still on the meta device (`zagreus.model.llama.meta_model`); each rank
    then materialises only its shard (`materialize`). An initialised model, identical on every
    rank, works as well.

    Order: pipeline split -> TP -> AC -> compile -> FSDP2 (see the module docstring for why).
    """
    dims.check_features(activation_checkpointing, compile)
    pp_rank = mesh["pp"].get_local_rank() if mesh is not None else 0
    if mesh is not None:
        log.info("parallel layout %s on a %s mesh %s; this rank: pp stage %d, dp rank %d; AC %s, compile %s",
                 dims, mesh.device_type, tuple(mesh.shape), pp_rank, dp_mesh(mesh).get_local_rank(),
                 activation_checkpointing, compile)
    split_stage(model, pp_rank, dims.pp)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], loss_parallel)
    if activation_checkpointing:
        apply_ac(model)
    if compile:
        apply_compile(model)
    if dims.dp > 1:
        apply_data_parallel(model, dims, mesh, param_dtype, reduce_dtype)
    return ParallelModel(model, dims, mesh, device, loss_fn=loss_fn, model_loss=model_loss, loss_parallel=loss_parallel,
                         pp_schedule=pp_schedule, pp_microbatches=pp_microbatches, local_batch=local_batch,
                         autocast=autocast)
