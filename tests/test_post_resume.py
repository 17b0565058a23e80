"""SFT and DPO resume exactly: a run SIGKILLed (or SIGTERMed) mid-way and started again logs the same
losses, bit for bit, and exports the same weights as one uninterrupted run of the same recipe.

Real `zagreus sft` / `zagreus dpo` processes on a tiny model and hand-written chats.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

QA = [
    ("Qual è la capitale d'Italia?", "Roma."), ("What colour is the sky?", "Blue, on a clear day."),
    ("Quanto fa due più due?", "Quattro."), ("Who wrote the Divine Comedy?", "Dante Alighieri."),
    ("Come si chiama il gatto?", "Il gatto si chiama Nerone."), ("Name a prime number.", "Seven."),
    ("Di che colore è il mare?", "Blu."), ("How many legs has a spider?", "Eight."),
]


@pytest.fixture(scope="module")
def init_export(tmp_path_factory) -> Path:
    """A randomly initialised tiny model with a small BPE, in the export format."""
    from zagreus.model.config import resolve_model_config
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import build_model
    from zagreus.tokenizer import train_bpe

    tok = train_bpe([q + " " + a for q, a in QA] * 10, 400, tmp_path_factory.mktemp("bpe"))
    cfg = resolve_model_config("tiny", vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               intermediate_size=128, max_seq_len=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return save_hf(build_model(cfg, seed=0), tok, tmp_path_factory.mktemp("init") / "export")


def _recipe(folder: Path, stage: str, init: Path, **section) -> Path:
    folder.mkdir(parents=True)
    if stage == "sft":
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
        body = {"packing": False, "seq_len": 128, "micro_batch": 2, "epochs": 12}
    else:
        rows = [{"prompt": q, "chosen": a, "rejected": "Non lo so."} for q, a in QA]
        body = {"beta": 0.5, "seq_len": 128, "micro_batch": 2, "epochs": 12}
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    body.update({"init": str(init), "datasets": [{"path": "data.jsonl"}], "log_every": 1, "device": "cpu",
                 "optimizer": {"lr": 3e-3}, "schedule": {"kind": "cosine", "warmup": 4},
                 "checkpoint": {"every": 5, "keep": 2}}, **section)
    path = folder / "recipe.yaml"
    model = {"preset": "tiny", "overrides": {"hidden_size": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                             "intermediate_size": 128, "max_seq_len": 256}}  # init_export's shape
    path.write_text(yaml.safe_dump({"name": "resume", "run_dir": str(folder / "run"), "model": model,
                                    "pretrain": {"loss_chunk": 64}, stage: body}))
    return path


def _env() -> dict:
    # One thread in every run: fp32 CPU results are bitwise reproducible only then.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _records(stage_dir: Path) -> dict[int, dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        out[record["step"]] = record
    return out


def _run(stage: str, recipe: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zagreus.cli", stage, str(recipe)], env=_env(), capture_output=True,
                          text=True, timeout=300)


def _interrupt(stage: str, recipe: Path, stage_dir: Path, target: int, sig: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "zagreus.cli", stage, str(recipe)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if max(_records(stage_dir) or [0]) >= target:
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    proc.communicate(timeout=180)
    return proc


# Per-step facts that must match bitwise (throughput and wall time may not).
KEYS = {"sft": ("loss", "lr", "grad_norm", "epoch", "trained_tokens"),
        "dpo": ("loss", "lr", "grad_norm", "epoch", "rewards_chosen", "rewards_rejected", "margins", "accuracy")}


def _facts(stage: str, stage_dir: Path) -> dict[int, tuple]:
    return {step: tuple(r[k] for k in KEYS[stage]) for step, r in _records(stage_dir).items()}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(stage, init_export, tmp_path):
    whole = _recipe(tmp_path / "whole", stage, init_export)
    done = _run(stage, whole)
    assert done.returncode == 0, done.stderr[-2000:]
    whole_dir = tmp_path / "whole" / "run" / stage
    reference = _facts(stage, whole_dir)
    assert sorted(reference) == list(range(1, 49))  # 8 examples / 2 per step x 12 epochs

    killed = _recipe(tmp_path / "killed", stage, init_export)
    stage_dir = tmp_path / "killed" / "run" / stage
    target = random.Random().randint(7, 40)  # after the first checkpoint (step 5), before the end
    proc = _interrupt(stage, killed, stage_dir, target, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {target}"
    from zagreus.rundir import list_checkpoints

    saved = [s for s, _ in list_checkpoints(stage_dir)]
    assert saved and 5 <= saved[-1] < 48 and not (stage_dir / "summary.json").exists(), saved
    resumed = _run(stage, killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {stage_dir / 'checkpoints'}" in resumed.stderr
    got = _facts(stage, stage_dir)
    assert sorted(got) == list(range(1, 49))
    for step in range(1, 49):
        assert got[step] == reference[step], f"step {step} (killed at {target}, resumed from {saved[-1]})"
    ours, theirs = load_file(str(stage_dir / "export" / "model.safetensors")), load_file(
        str(whole_dir / "export" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 48


def test_sigterm_saves_the_step_in_flight_and_exits_143(init_export, tmp_path):
    """SIGTERM mid-SFT: the step ends, a checkpoint of it is saved (none is due), the exit status is 143,
    no export is written; the same command then finishes the run."""
    recipe = _recipe(tmp_path / "t", "sft", init_export, checkpoint={"every": 1000, "keep": 2})
    stage_dir = tmp_path / "t" / "run" / "sft"
    proc = _interrupt("sft", recipe, stage_dir, 6, signal.SIGTERM)
    assert proc.returncode == 143
    from zagreus.rundir import list_checkpoints

    saved = [s for s, _ in list_checkpoints(stage_dir)]
    assert len(saved) == 1 and 6 <= saved[0] < 48 and max(_records(stage_dir)) == saved[0], saved
    assert not (stage_dir / "export").exists()
    again = _run("sft", recipe)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(_records(stage_dir)) == list(range(1, 49)) and (stage_dir / "export" / "config.json").is_file()
