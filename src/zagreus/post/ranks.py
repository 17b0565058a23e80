"""Data parallelism for SFT and DPO under torchrun: which rank trains which examples, the model in
its FSDP2 form, and the few collectives the stages need.

Every rank opens the whole starting model (identical on all of them), then FSDP2 shards it in
place over `<stage>.parallel` (dp_shard, dp_replicate on one mesh; tp and pp are refused: the
packed document masks and per-conversation RoPE positions are not sharded along the sequence).
An optimizer step takes micro_batch x grad_accum x world examples; rank r trains the r-th
contiguous block of them, cut into grad_accum micro-batches, which are exactly the micro-batches
a single process with grad_accum x world would run. A rank whose block is short (the last step
of an epoch) runs an empty stand-in micro-batch, because FSDP2's collectives need every rank in
every forward and backward. Losses are normalised by counts summed over all ranks, and FSDP2
averages gradients over the world, so each rank's backward is scaled by the world size: the
update is the single process's, up to the order of float additions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from zagreus.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Ranks:
    """This process's place in the data-parallel world (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, items: list, per_rank: int) -> list:
        """This rank's contiguous share of a step's items (empty when the step is short)."""
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (float64 kept), on the CPU."""
        if self.world == 1:
            return values
        t = values.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def all_gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's `rows` (the same shape on all ranks) stacked in rank order along dim 0."""
        if self.world == 1:
            return rows
        parts = [torch.empty_like(rows, device=self.device) for _ in range(self.world)]
        dist.all_gather(parts, rows.to(self.device))
        return torch.cat([p.cpu() for p in parts])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def open_ranks(stage: str, sec, device: torch.device) -> tuple[Ranks, object]:
    """(ranks, dims) from torchrun's environment and `<stage>.parallel`; initialises torch.distributed."""
    from zagreus.train.loop import init_distributed
    from zagreus.train.parallel import ParallelDims

    info = init_distributed(device.type)
    par = sec.parallel
    if par.tp > 1 or par.pp > 1:
        raise UserError(f"{stage}.parallel: tp and pp are for pretraining; post-training is data-parallel only. "
                        f"Set {stage}.parallel.tp and .pp to 1 (dp_shard: -1 shards over every rank)")
    dims = ParallelDims.resolve(par.dp_replicate, par.dp_shard, 1, 1, world_size=info.world, where=f"{stage}.parallel")
    return Ranks(info.rank, info.world, device), dims


def shard_model(model: nn.Module, dims, sec, device: torch.device) -> None:
    """FSDP2 (or replication) of the loaded model in place, over every rank."""
    if dims.world_size == 1:
        return
    from zagreus.train.parallel import apply_data_parallel, build_mesh, resolve_param_dtype

    par = sec.parallel
    apply_data_parallel(model, dims, build_mesh(dims, device.type), resolve_param_dtype(par.param_dtype, device),
                        getattr(torch, par.reduce_dtype))
    log.info("data parallel over %d ranks (%s), this is rank %s", dims.world_size, dims,
             os.environ.get("RANK", "0"))


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
    whole = build_model(model.cfg)
    whole.load_state_dict(state)
    return whole
