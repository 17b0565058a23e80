"""dp / tp / pp / 3D training equals a single-process run (CPU, gloo, spawned processes).

Each configuration spawns one world, trains five AdamW steps (with gradient clipping active)
through `zagreus.train.parallel`, and every rank writes its losses and the full (gathered)
weights; the parent compares them with a plain single-process loop written here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.llama import Transformer
from zagreus.train.parallel import ParallelDims, build_mesh, parallelize, plain, split_stage, stage_layers

SEQ, BATCH, STEPS = 32, 8, 5
LR, WD, CLIP = 1e-3, 0.01, 0.5
# Adam's update g / (sqrt(v) + eps) amplifies float rounding of a gradient whose size is near
# eps: with eps = 1e-8 one o_proj element (gradient -4e-9 at step 1, a cancellation) moves by
# 5.6e-5 between two summation orders, whatever the parallel layout. eps = 1e-6 keeps the
# comparison about parallelism, not about the conditioning of that element.
EPS = 1e-6
TOL = 1e-5


def tiny_config(tie: bool) -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=128,
                       max_seq_len=64, init_std=0.02, tie_embeddings=tie)


def batches(steps: int) -> torch.Tensor:
    """[steps, BATCH, SEQ + 1] token ids; inputs are [:, :-1], targets [:, 1:].

    Drawn from 32 of the 512 ids, so five steps visibly learn the unigram distribution.
    """
    return torch.randint(0, 32, (steps, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=WD)


def reference_run(cfg: ModelConfig, steps: int) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """The plain loop: whole batch, one process, torch's own clip_grad_norm_."""
    torch.set_num_threads(1)
    model = Transformer(cfg)
    model.init_weights(0)
    opt = make_optimizer(model.parameters())
    losses, norms = [], []
    for tokens in batches(steps):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(0, 1))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, norms


def _worker(rank: int, world: int, dims: ParallelDims, cfg: ModelConfig, tmp: str, schedule: str, ac: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        mesh = build_mesh(dims, "cpu")
        model = Transformer(cfg)
        model.init_weights(0)
        pm = parallelize(model, dims, mesh, torch.device("cpu"), activation_checkpointing=ac, pp_schedule=schedule,
                         pp_microbatches=2 * dims.pp)
        opt = make_optimizer(pm.parameters())
        per = BATCH // pm.dp_world
        losses, norms = [], []
        for tokens in batches(STEPS):
            # Every rank reads only its data-parallel share of the global batch.
            mine = tokens[pm.dp_rank * per:(pm.dp_rank + 1) * per]
            losses.append(pm.forward_backward(mine[:, :-1], mine[:, 1:]).item())
            norms.append(float(pm.clip_grad_norm_(CLIP)))
            opt.step()
            opt.zero_grad()
        weights = {k: plain(v).detach().clone() for k, v in pm.model.state_dict().items()}
        torch.save({"losses": losses, "norms": norms, "weights": weights, "dp_rank": pm.dp_rank}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


@pytest.fixture(scope="module")
def references():
    return {tie: reference_run(tiny_config(tie), STEPS) for tie in (True, False)}


@pytest.mark.parametrize("dims,tie,schedule,ac", [
    (ParallelDims(dp_shard=2), True, "1f1b", False),
    (ParallelDims(tp=2), True, "1f1b", False),
    (ParallelDims(pp=2), False, "1f1b", False),
    (ParallelDims(dp_shard=2, tp=2, pp=2), False, "gpipe", True),
], ids=["dp2", "tp2", "pp2-1f1b", "dp2xtp2xpp2-gpipe-ac"])
def test_parallel_training_equals_single_process(tmp_path: Path, references, dims, tie, schedule, ac) -> None:
    cfg = tiny_config(tie)
    ref_losses, ref_weights, ref_norms = references[tie]
    assert max(ref_norms) > CLIP  # clipping is active, so the global norm over shards/stages matters
    mp.start_processes(_worker, args=(dims.world_size, dims, cfg, str(tmp_path), schedule, ac), nprocs=dims.world_size,
                       join=True, start_method="spawn")
    seen: set[str] = set()
    for rank in range(dims.world_size):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["losses"] == pytest.approx(ref_losses, abs=TOL), f"rank {rank}"
        assert out["norms"] == pytest.approx(ref_norms, abs=TOL), f"rank {rank}"
        for name, w in out["weights"].items():
            name = _clean(name)
            seen.add(name)
            torch.testing.assert_close(w, ref_weights[name], atol=TOL, rtol=0, msg=f"rank {rank} {name}")
    # Together the stages hold every weight of the model.
    assert seen == set(ref_weights)
    assert ref_losses[-1] < ref_losses[0]


def test_pipeline_split_and_tied_embeddings_refused() -> None:
    assert [list(r) for r in stage_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    model = Transformer(tiny_config(tie=False))
    split_stage(model, 1, 2)
    assert list(model.layers) == ["2", "3"] and model.embed_tokens is None and model.lm_head is not None
    with pytest.raises(UserError, match="tie_embeddings: false"):
        split_stage(Transformer(tiny_config(tie=True)), 0, 2)


def test_dims_resolution_errors() -> None:
    assert ParallelDims.resolve(1, -1, 2, 2, world_size=8) == ParallelDims(1, 2, 2, 2)
    with pytest.raises(UserError, match="do not divide|does not divide"):
        ParallelDims.resolve(1, -1, 3, 1, world_size=8)
    with pytest.raises(UserError, match="torchrun"):
        ParallelDims.resolve(1, 2, 2, 1, world_size=8)
    with pytest.raises(UserError, match="n_kv_heads"):
        ParallelDims(tp=4).check_model(tiny_config(tie=False), seq_len=32)
