"""The per-GPU memory estimate of `zagreus check` (zagreus.train.memory) against what torch really holds.

Activations: the bytes autograd saves in our Transformer's forward, counted as unique storages
under saved_tensors_hooks (parameters excluded), on CPU. fp32 is the case the estimate is
specified for; bf16 weights (FSDP2's param_dtype) and fp32 weights under bf16 autocast (one GPU)
are measured with CPU autocast, which casts as CUDA's does for every op our model runs (matmuls
and SDPA in bf16; the fp32 ops of the norms and the loss get fp32 inputs either way).
CPU's SDPA is a flash kernel too and saves what CUDA's does (q, k, v, output, log-sum-exp; CUDA
adds two scalar RNG tensors), so no correction is needed for the CUDA estimate.
Parameters: real local shards on one process, through a fake process group of the layout's size.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from zagreus.cli import app
from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.llama import build_model, meta_model
from zagreus.train.loop import compute_loss
from zagreus.train.memory import FP32, GPUS, Precision, activation_bytes, stage_params
from zagreus.train.parallel import ParallelDims, apply_ac, build_mesh, cross_entropy, parallelize

REPO = Path(__file__).resolve().parents[1]
# The counts agree to the byte but for 0-d tensors (nll_loss's total_weight); 1% still catches a
# missing term that the 10% asked of the estimate would let through (the loss's bf16 head copy is 2%).
TOLERANCE = 0.01
ITA = REPO / "recipes" / "zagreus-0.4b-ita.yaml"

SHAPES = [  # (config, micro-batch, seq_len): hidden, MLP, KV heads, tying and lengths all vary
    (ModelConfig(vocab_size=512, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=384,
                 max_seq_len=256), 2, 64),
    (ModelConfig(vocab_size=1000, hidden_size=192, n_layers=3, n_heads=6, n_kv_heads=1, intermediate_size=512,
                 max_seq_len=256, tie_embeddings=False), 3, 128),
    (ModelConfig(vocab_size=700, hidden_size=96, n_layers=2, n_heads=3, n_kv_heads=3, intermediate_size=160,
                 max_seq_len=512), 1, 256),
]
PRECISIONS = {  # model dtype, CPU autocast, and the Precision the estimate is given
    "fp32": (torch.float32, False, Precision(params=4, compute=4)),
    "bf16 weights": (torch.bfloat16, True, Precision(params=2, compute=2)),
    "fp32 weights, bf16 autocast": (torch.float32, True, Precision(params=4, compute=2)),
}


def saved_bytes(cfg: ModelConfig, seqs: int, seq_len: int, dtype: torch.dtype, autocast: bool, ac: bool,
                fused: bool) -> int:
    """Bytes of the distinct storages autograd saves in one training forward (parameters excluded)."""
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype)
    if ac:
        apply_ac(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t  # kept alive until backward, so no storage is reused under another tensor

    x = torch.randint(0, cfg.vocab_size, (seqs, seq_len))
    y = torch.randint(0, cfg.vocab_size, (seqs, seq_len))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        if fused:  # the pretraining loss: the head fused into the chunked cross-entropy
            loss = compute_loss(model, {"input": x, "target": y}, chunk_tokens=64)
        else:  # what TP / PP run: logits, then parallel.cross_entropy
            loss = cross_entropy(model(x), y)
    loss.backward()  # the graph was whole
    return sum(saved.values())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("ac", [False, True], ids=["no-ac", "ac"])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_activation_estimate_matches_saved_tensors(shape, ac, precision):
    cfg, seqs, seq_len = SHAPES[shape]
    dtype, autocast, prec = PRECISIONS[precision]
    measured = saved_bytes(cfg, seqs, seq_len, dtype, autocast, ac, fused=True)
    estimated = activation_bytes(cfg, seqs, seq_len, prec, layers=cfg.n_layers, ac=ac, loss_chunk=64).saved
    assert estimated == pytest.approx(measured, rel=TOLERANCE), (estimated, measured)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_unfused_loss_estimate_matches_saved_tensors(precision):
    cfg, seqs, seq_len = SHAPES[1]
    dtype, autocast, prec = PRECISIONS[precision]
    measured = saved_bytes(cfg, seqs, seq_len, dtype, autocast, ac=False, fused=False)
    estimated = activation_bytes(cfg, seqs, seq_len, prec, layers=cfg.n_layers, ac=False, fused_loss=False).saved
    assert estimated == pytest.approx(measured, rel=TOLERANCE), (estimated, measured)


def test_checkpointing_keeps_one_residual_per_block():
    """What the AC estimate assumes, measured: each checkpointed block keeps exactly its input (tokens x hidden)."""
    cfg, seqs, seq_len = SHAPES[0]
    deeper = cfg.model_copy(update={"n_layers": 6})
    fp32 = PRECISIONS["fp32"]
    grown = saved_bytes(deeper, seqs, seq_len, *fp32[:2], ac=True, fused=True) - \
        saved_bytes(cfg, seqs, seq_len, *fp32[:2], ac=True, fused=True)
    assert grown == 4 * seqs * seq_len * cfg.hidden_size * FP32


# --- parameters, gradients, optimizer ---------------------------------------------------------
@contextlib.contextmanager
def fake_world(size: int, rank: int):
    """A process group of `size` ranks in which this process is `rank` and collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_numel(cfg: ModelConfig, dims: ParallelDims, rank: int) -> int:
    """Elements of the parameters `rank` holds after parallelize (meta device: nothing is allocated)."""
    from torch.distributed.tensor import DTensor

    with fake_world(dims.world_size, rank):
        model = meta_model(cfg)
        parallelize(model, dims, build_mesh(dims, "cpu"), torch.device("cpu"), local_batch=dims.pp)
        return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


LAYOUTS = [  # sizes that no degree divides evenly where FSDP2 allows it (its first ranks take the ceiling)
    ParallelDims(dp_shard=3),
    ParallelDims(dp_replicate=2, dp_shard=3),
    ParallelDims(dp_shard=3, tp=2),
    ParallelDims(dp_shard=2, tp=2, pp=2),
    ParallelDims(dp_replicate=2, pp=3),
]


@pytest.mark.parametrize("dims", LAYOUTS, ids=str)
def test_model_states_are_the_real_local_shards(dims):
    cfg = ModelConfig(vocab_size=1000, hidden_size=96, n_layers=5, n_heads=6, n_kv_heads=2, intermediate_size=250,
                      max_seq_len=256, tie_embeddings=dims.pp == 1)
    ranks_per_stage = dims.world_size // dims.pp
    for stage in range(dims.pp):
        rank = stage * ranks_per_stage  # dp rank 0, tp rank 0 of the stage: the largest shard
        assert stage_params(cfg, dims, stage).total == local_numel(cfg, dims, rank)
        # What FSDP2 all-gathers: the same layout without data parallelism.
        unsharded = ParallelDims(tp=dims.tp, pp=dims.pp)
        assert stage_params(cfg, dims, stage, shard=False).total == local_numel(cfg, unsharded, stage * dims.tp)
    if dims.world_size == dims.dp:
        assert stage_params(cfg, ParallelDims(), 0).total == cfg.param_counts()["total"]


# --- the CLI --------------------------------------------------------------------------------
def check(*args: str):
    result = CliRunner().invoke(app, ["check", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_check_estimates_the_reports_layout():
    from zagreus.recipe import load_recipe

    lines = check(ITA, "--gpus", 64, "--gpu", "a100-80gb")
    text = "\n".join(lines)
    for part in ("parameters  :", "gradients   :", "optimizer   :", "gathered    :", "activations :", "peak        :"):
        assert part in text, text
    assert "64 GPUs = dp_replicate 1 x dp_shard 64 x tp 1 x pp 1" in text
    assert "bf16 compute on CUDA" in text
    verdict = next(line for line in lines if line.startswith("  fits in 80 GB: "))
    assert verdict.startswith("  fits in 80 GB: yes (estimated peak "), verdict
    # The step time is FLOPs / (GPUs x peak x MFU): 1,048,576 tokens per step on 64 A100s at 50%.
    recipe = load_recipe(ITA, check_inputs=False)
    tokens, steps = recipe.pretrain.tokens_per_step, recipe.pretrain.steps
    seconds = recipe.model.resolve().flops_per_token(4096) * tokens / (64 * 312e12 * 0.5)
    assert f"{seconds:.3g} s per step of 1,048,576 tokens" in text
    assert f"{tokens / seconds / 64:,.0f} tokens/s per GPU" in text
    assert f"{steps * seconds / 86400:.1f} days for 953,675 steps" in text


def test_check_says_a_huge_micro_batch_does_not_fit(tmp_path):
    body = ITA.read_text().replace("micro_batch: 4\n", "micro_batch: 64\n").replace(
        "tokens_per_step: 1048576\n", "tokens_per_step: 16777216\n")  # one micro-batch of 64 x 4096 per GPU
    assert "micro_batch: 64" in body
    recipe = tmp_path / "huge.yaml"
    recipe.write_text(body)
    text = "\n".join(check(recipe, "--gpus", 64, "--gpu", "a100-80gb"))
    assert "fits in 80 GB: no (estimated peak " in text, text
    assert "it would fit with pretrain.activation_checkpointing: true" in text


def test_check_on_one_gpu_and_by_default(tmp_path):
    one = "\n".join(check(ITA, "--gpus", 1, "--gpu", "h100"))
    assert "bf16 autocast on CUDA over the fp32 weights" in one and "gathered" not in one
    assert "64 micro-batches of 4 x 4096" in one
    default = "\n".join(check(ITA))
    assert "--gpus not given: assumed 8 GPUs" in default and GPUS["h100"].name in default


def test_no_estimate_without_pretraining():
    text = "\n".join(check(REPO / "recipes" / "nesso-0.4b-instruct.yaml"))
    assert "memory per GPU" not in text and "throughput" not in text


def test_check_refuses_an_unknown_gpu():
    """A UserError, which zagreus.cli.main prints as one line (tests/test_recipe_cli.py runs that path)."""
    result = CliRunner().invoke(app, ["check", str(ITA), "--gpu", "v100"])
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == "--gpu v100: unknown GPU; choose one of a100-40gb, a100-80gb, h100, h200"
