"""SFT and DPO under torchrun (2 ranks, gloo, CPU) equal the single-process run: the same loss at
every step within 1e-5, gradient norms and DPO statistics within 1e-4 relative, and the same
exported weights (within 1e-4, and 1% of how far training moved them).

Two layouts: two data-parallel ranks (FSDP2) at grad_accum 1, and one tensor-parallel pair at
grad_accum 2, against one process at grad_accum 2, so all train on the same examples per step.
With two data-parallel ranks the packed SFT rows are odd in number, so the last step of every
epoch is short and rank 1 runs the stand-in micro-batch there; the 11 DPO pairs split 6 and 5 for
the reference log-probabilities, which both ranks compute once and store. A two-rank run killed
mid-way resumes to the uninterrupted run's losses, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_post_resume import _records

VOCAB = 384
WORDS = ("Roma", "Milano", "Torino", "Napoli", "Firenze", "Venezia", "Bologna", "Genova", "Palermo", "Bari", "Trieste")


def _chats() -> list[tuple[str, str]]:
    out = []
    for i, city in enumerate(WORDS):
        out.append((f"Dove si trova {city}?", f"{city} è in Italia, città numero {i}."))
        out.append((f"Tell me about {city}.", f"{city} is an Italian city; it has {i + 2} bridges."))
    return out


@pytest.fixture(scope="module")
def init_export(tmp_path_factory) -> Path:
    from zagreus.model.config import resolve_model_config
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import build_model
    from zagreus.tokenizer import train_bpe

    tok = train_bpe([q + " " + a for q, a in _chats()] * 5, 400, tmp_path_factory.mktemp("bpe"))
    # 384 rows of embeddings for the BPE's 377 tokens: tensor parallelism splits the vocabulary in two.
    cfg = resolve_model_config("tiny", vocab_size=VOCAB, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               intermediate_size=128, max_seq_len=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return save_hf(build_model(cfg, seed=0), tok, tmp_path_factory.mktemp("init") / "export")


def _recipe(folder: Path, stage: str, init: Path, grad_accum: int, **section) -> Path:
    folder.mkdir(parents=True)
    chats = _chats()
    if stage == "sft":
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in chats[:21]]
        # seq_len 128 packs two or three conversations a row: 21 conversations make an odd number of rows.
        body = {"packing": True, "seq_len": 128, "epochs": 3}
    else:
        rows = [{"prompt": chats[i][0], "chosen": chats[i][1], "rejected": chats[i + 1][1]} for i in range(0, 22, 2)]
        body = {"beta": 0.5, "seq_len": 96, "epochs": 3, "loss": "sigmoid", "label_smoothing": 0.1}
    (folder / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    body.update({"init": str(init), "datasets": [{"path": "data.jsonl"}], "log_every": 1, "device": "cpu",
                 "micro_batch": 2 if stage == "dpo" else 1, "grad_accum": grad_accum, "optimizer": {"lr": 3e-3},
                 "schedule": {"kind": "cosine", "warmup": 2}, "checkpoint": {"every": 2, "keep": 2}}, **section)
    model = {"preset": "tiny", "overrides": {"hidden_size": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                             "intermediate_size": 128, "max_seq_len": 256, "vocab_size": VOCAB}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "dist", "run_dir": str(folder / "run"), "model": model,
                                    "pretrain": {"loss_chunk": 64}, stage: body}))
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _single(stage: str, recipe: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zagreus.cli", stage, str(recipe)], env=_env(), capture_output=True,
                          text=True, timeout=300)


def _torchrun_cmd(stage: str, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "zagreus.cli",
            stage, str(recipe)]


KEYS = {"sft": ("grad_norm", "trained_tokens"),
        "dpo": ("grad_norm", "rewards_chosen", "rewards_rejected", "margins", "accuracy")}


@pytest.fixture(scope="module")
def single_runs(init_export, tmp_path_factory) -> dict[str, Path]:
    """The single-process reference of each stage, at grad_accum 2."""
    out = {}
    for stage in ("sft", "dpo"):
        folder = tmp_path_factory.mktemp(f"one-{stage}") / "one"
        done = _single(stage, _recipe(folder, stage, init_export, grad_accum=2))
        assert done.returncode == 0, done.stderr[-3000:]
        out[stage] = folder / "run" / stage
    return out


# dp: two data-parallel ranks (FSDP2) at grad_accum 1; tp: one tensor-parallel pair at grad_accum 2.
LAYOUTS = {"dp": ({"dp_shard": 2}, 1), "tp": ({"dp_shard": 1, "tp": 2}, 2)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_ranks_equal_one_process(stage, layout, init_export, single_runs, tmp_path):
    parallel, grad_accum = LAYOUTS[layout]
    two = _recipe(tmp_path / "two", stage, init_export, grad_accum=grad_accum, parallel=parallel)
    ran = subprocess.run(_torchrun_cmd(stage, two), env=_env(), capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-4000:]

    a, b = _records(single_runs[stage]), _records(tmp_path / "two" / "run" / stage)
    summary_one = json.loads((single_runs[stage] / "summary.json").read_text())
    summary_two = json.loads((tmp_path / "two" / "run" / stage / "summary.json").read_text())
    steps = summary_one["steps"]
    assert steps >= 6 and summary_two["steps"] == steps and summary_two["ranks"] == 2
    if stage == "sft":
        assert summary_one["rows"] % 2 == 1  # a short step: rank 1 runs the stand-in
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, (stage, step, a[step]["loss"], b[step]["loss"])
        for key in KEYS[stage]:  # gradient norms and DPO's rewards: float-order noise, 1e-4 relative
            assert abs(a[step][key] - b[step][key]) <= 1e-4 * max(1.0, abs(a[step][key])), (stage, step, key, a[step][key],
                                                                                            b[step][key])
    assert a[steps]["loss"] < a[1]["loss"] - 0.05  # it learnt something, so equal weights mean something
    ours = load_file(str(tmp_path / "two" / "run" / stage / "export" / "model.safetensors"))
    theirs = load_file(str(single_runs[stage] / "export" / "model.safetensors"))
    start = load_file(str(init_export / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        # Adam's normalised updates carry float-order noise of the gradients into the weights:
        # equal to 1e-4, and to within 1% of how far training moved each matrix.
        gap, moved = (ours[name] - theirs[name]).abs().max(), (theirs[name] - start[name]).abs().max()
        assert gap <= 1e-4 and gap <= 0.01 * moved, (name, float(gap), float(moved))
    if stage == "dpo":  # the stored reference: both ranks' blocks, equal to the single process's
        ref_one = torch.load(single_runs["dpo"] / "reference_logprobs.pt", weights_only=True)["logprobs"]
        ref_two = torch.load(tmp_path / "two" / "run" / "dpo" / "reference_logprobs.pt", weights_only=True)["logprobs"]
        # Sums of some 30 float32 log-probabilities near -90: a few ulps of 90 apart at most.
        assert ref_two.shape == (11, 2) and torch.allclose(ref_one, ref_two, rtol=1e-6, atol=1e-5)


def test_sigkill_under_torchrun_then_resume(init_export, tmp_path):
    """torchrun's whole process group killed after a checkpoint, then the same command: every logged
    loss equals the uninterrupted two-rank run's, bit for bit, no step missing or doubled."""
    whole = _recipe(tmp_path / "whole", "sft", init_export, grad_accum=1)
    ran = subprocess.run(_torchrun_cmd("sft", whole), env=_env(), capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-4000:]
    reference = _records(tmp_path / "whole" / "run" / "sft")

    killed = _recipe(tmp_path / "killed", "sft", init_export, grad_accum=1)
    stage_dir = tmp_path / "killed" / "run" / "sft"
    proc = subprocess.Popen(_torchrun_cmd("sft", killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and max(_records(stage_dir) or [0]) < 5:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before step 5"
    # torchrun and both ranks at once (the ranks run in their own process groups).
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len(ranks) >= 2
    for p in [psutil.Process(proc.pid)] + ranks:
        p.kill()
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in alive), alive
    assert not (stage_dir / "summary.json").exists()
    again = subprocess.run(_torchrun_cmd("sft", killed), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stderr
    got = _records(stage_dir)
    assert sorted(got) == sorted(reference)
    for step in reference:
        assert (got[step]["loss"], got[step]["grad_norm"]) == (reference[step]["loss"], reference[step]["grad_norm"]), step
