"""Meta-device construction and FSDP2 mixed precision under torchrun (gloo, CPU).

- A model built on the meta device, parallelised there and then materialised per rank has,
  gathered, exactly the initial weights of the single-process `build_model`, under dp=2
  (FSDP2), tp=2, pp=2 (with activation checkpointing) and dp=2 x tp=2; tied embeddings stay
  tied; a dp=2 rank allocates only its half.
- MixedPrecisionPolicy: with param_dtype bfloat16 the layers compute in bfloat16 while the
  sharded parameters and their gradients stay float32; reduce_dtype decides the precision of
  the gradient reduction (bfloat16: every reduced gradient is a bfloat16 value; float32: not).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_init_worker.py")


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(WORKER), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("nproc,layout", [(2, "dp_shard=2"), (2, "tp=2"), (2, "pp=2"), (4, "dp_shard=2,tp=2")])
def test_meta_init_equals_single_process_weights(tmp_path, nproc, layout) -> None:
    sys.path.insert(0, str(WORKER.parent))
    from dist_init_worker import config

    from zagreus.model.llama import build_model

    tie = "pp" not in layout
    want = dict(build_model(config(tie), seed=5).named_parameters(remove_duplicate=False))
    torchrun(nproc, "init", layout, str(tmp_path))
    got: dict[str, torch.Tensor] = {}
    for rank in range(nproc):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["tied"] == tie
        for name, value in saved["params"].items():
            if name in got:  # replicated across ranks (dp, tp): every copy the same
                assert torch.equal(got[name], value), name
            got[name] = value
        if layout == "dp_shard=2":
            total = sum(p.numel() for p in build_model(config(tie), seed=None).parameters())
            assert saved["local"] <= total // 2 + 64  # norms' odd shards round up
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value.detach()), name


def test_mixed_precision_policy_dtypes_and_reduction(tmp_path) -> None:
    runs = {}
    for reduce in ("float32", "bfloat16"):
        out = tmp_path / reduce
        out.mkdir()
        torchrun(2, "mp", reduce, str(out))
        runs[reduce] = torch.load(out / "rank0.pt")
    for saved in runs.values():
        assert saved["seen"] == {"compute_weight": "torch.bfloat16", "output": "torch.bfloat16",
                                 "param": "torch.float32", "grad": "torch.float32"}

    def bf16_exact(grads: dict[str, torch.Tensor]) -> float:
        values = torch.cat([g.flatten() for g in grads.values()])
        return (values == values.bfloat16().float()).float().mean().item()

    assert bf16_exact(runs["bfloat16"]["grads"]) == 1.0
    assert bf16_exact(runs["float32"]["grads"]) < 0.9


def test_gpu_check_fsdp_on_one_rank_equals_plain_run(tmp_path) -> None:
    """The GPU check's NCCL part, run on CPU (gloo): FSDP2 over a one-rank mesh, built on meta,
    gives the losses of the plain model for 20 steps (benchmarks/gpu_check.py --smoke)."""
    import json

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--parts", "nccl", "--out", str(tmp_path)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())["results"]["nccl"]
    assert result["backend"] == "gloo" and len(result["fsdp_losses"]) == 20
    # fp32 on CPU: equal up to summation order, far inside the bf16 tolerance the GPU run uses.
    assert result["max_rel_diff"] < 1e-5
    assert result["fsdp_losses"][-1] < result["fsdp_losses"][0]
    assert "| yes |" in (tmp_path / "gpu_check.md").read_text()
