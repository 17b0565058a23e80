"""Data and tensor parallelism for SFT and DPO under torchrun: which rank trains which examples,
the model in its distributed form, and the few collectives the stages need.

Every rank opens the whole starting model (identical on all of them); `shard_model` then turns it
in place into its distributed form over `<stage>.parallel`, as pretraining does: TP first
(Megatron-style with sequence-parallel norms, logits sharded on the vocabulary and the loss
computed loss-parallel), then FSDP2 over dp_shard x dp_replicate. pp is refused (a pipeline would
have to carry the packed document masks and positions between stages).

An optimizer step takes micro_batch x grad_accum x dp examples; data-parallel rank r trains the
r-th contiguous block of them (the ranks of one TP group train the same block), cut into
grad_accum micro-batches, which are exactly the micro-batches a single process with
grad_accum x dp would run. A rank whose block is short (the last step of an epoch) runs an empty
stand-in micro-batch, because FSDP2's collectives need every rank in every forward and backward.
Losses are normalised by counts summed over the data-parallel ranks, and FSDP2 averages gradients
over them, so each backward is scaled by dp: the update is the single process's, up to the order
of float additions. Batches are padded to a multiple of tp, which sequence parallelism shards.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from zagreus.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Ranks:
    """This process's place in the world (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    dp_rank: int = 0
    dp: int = 1
    tp: int = 1
    dims: object = None  # zagreus.train.parallel.ParallelDims under torchrun
    mesh: object = field(default=None, repr=False)  # its DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _dp_group(self):
        from zagreus.train.parallel import dp_mesh

        return dp_mesh(self.mesh).get_group()

    def block(self, items: list, per_rank: int) -> list:
        """This data-parallel rank's contiguous share of a step's items (empty when the step is short)."""
        return items[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over the data-parallel ranks (float64 kept), on the CPU."""
        if self.dp == 1:
            return values
        t = values.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._dp_group())
        return t.cpu()

    def all_gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every data-parallel rank's `rows` (the same shape on all) stacked in rank order along dim 0."""
        if self.dp == 1:
            return rows
        parts = [torch.empty_like(rows, device=self.device) for _ in range(self.dp)]
        dist.all_gather(parts, rows.to(self.device), group=self._dp_group())
        return torch.cat([p.cpu() for p in parts])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Around forward and backward: with tp > 1 the vocabulary-sharded logits' cross-entropy."""
        if self.tp == 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()


def post_dims(stage: str, par, world: int):
    """The degrees of `<stage>.parallel` over `world` processes (ParallelDims); pp is refused."""
    from zagreus.train.parallel import ParallelDims

    if par.pp > 1:
        raise UserError(f"{stage}.parallel.pp: pipeline parallelism is for pretraining; post-training runs dp_shard, "
                        f"dp_replicate and tp. Set {stage}.parallel.pp to 1")
    return ParallelDims.resolve(par.dp_replicate, par.dp_shard, par.tp, 1, world_size=world, where=f"{stage}.parallel")


def open_ranks(stage: str, sec, device: torch.device) -> Ranks:
    """The ranks from torchrun's environment and `<stage>.parallel`; initialises torch.distributed."""
    from zagreus.train.loop import init_distributed
    from zagreus.train.parallel import build_mesh, dp_mesh

    info = init_distributed(device.type)
    dims = post_dims(stage, sec.parallel, info.world)
    if info.world == 1:
        return Ranks(device=device)
    mesh = build_mesh(dims, device.type)
    return Ranks(info.rank, info.world, device, dp_mesh(mesh).get_local_rank(), dims.dp, dims.tp, dims, mesh)


def shard_model(model: nn.Module, ranks: Ranks, stage: str, sec) -> None:
    """The loaded model in its distributed form, in place: TP, then FSDP2 (or replication)."""
    if ranks.world == 1:
        return
    from zagreus.train.parallel import apply_data_parallel, apply_tp, resolve_param_dtype

    dims, par = ranks.dims, sec.parallel
    dims.check_model(model.cfg, None, where=f"{stage}.parallel")
    if dims.tp > 1:
        apply_tp(model, ranks.mesh["tp"], loss_parallel=True)
    if dims.dp > 1:
        apply_data_parallel(model, dims, ranks.mesh, resolve_param_dtype(par.param_dtype, ranks.device),
                            getattr(torch, par.reduce_dtype))
    log.info("%s over %d ranks (%s); this is rank %d, data-parallel rank %d", stage, ranks.world, dims, ranks.rank,
             ranks.dp_rank)


def reshard(model: nn.Module) -> None:
    """Back to the sharded parameters after forwards without a backward (DPO's reference pass):
    the root stays gathered after its forward, and an optimizer built then would hold the
    gathered copies instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gathered_model(model: nn.Module, ranks: Ranks) -> nn.Module | None:
    """The trained model whole: itself in one process; under torchrun a plain copy on rank 0's CPU,
    gathered from the shards (every rank must call this), and None on the other ranks."""
    if ranks.world == 1:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from zagreus.model.llama import build_model

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ranks.is_main:
        return None
    whole = build_model(model.cfg, seed=None)
    whole.load_state_dict(state)
    return whole
