"""`zagreus slurm`: the sbatch script for 2 nodes x 8 GPUs, run by bash against fake Slurm tools."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zagreus.cli import app
from zagreus.errors import UserError
from zagreus.launch.slurm import SlurmJob, write_sbatch

RECIPE = """\
name: slurm-test
model: {preset: tiny}
pretrain:
  seq_len: 256
  parallel: {dp_shard: -1, tp: %d, pp: 1}
"""

# scontrol answers `show hostnames` like Slurm and logs `requeue`; srun logs its argv and runs
# until the test lets it stop, standing in for torchrun on every node.
FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a01\\ngpu-a02\\n'; exit 0; fi
echo "$@" >> "$FAKE_LOG/scontrol.log"
"""
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
for _ in $(seq 600); do [ -e "$FAKE_LOG/stop" ] && exit 0; sleep 0.1; done
exit 1
"""


def _recipe(tmp_path: Path, tp: int = 2) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE % tp)
    return path


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_sbatch_two_nodes_eight_gpus(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path)
    result = CliRunner().invoke(app, ["slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "8",
                                      "--partition", "gpu", "--time", "12:00:00", "--setup", "true"])
    assert result.exit_code == 0, result.output
    script = tmp_path / "runs" / "slurm-test" / "slurm" / "pretrain.sbatch"
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", f"#SBATCH --output={script.parent}/%x-%j.out",
                 "#SBATCH --job-name=slurm-test"):
        assert line in text.splitlines(), line
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # Run the script as Slurm would on the first node, with fake scontrol/srun.
    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", "FAKE_LOG": str(log),
           "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log / "srun.args").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]  # the script reached srun and waits on it
    time.sleep(0.2)
    # The time-limit warning: the batch shell requeues the job while training keeps going.
    proc.send_signal(signal.SIGUSR1)
    deadline = time.time() + 30
    while not (log / "scontrol.log").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None  # the trap did not end the job; training runs until Slurm stops it
    (log / "stop").touch()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (log / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "rendezvous gpu-a01:29500" in out
    assert (log / "srun.args").read_text().splitlines() == [
        "--kill-on-bad-exit=1", "torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-id=4242",
        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a01:29500", "-m", "zagreus.cli", "pretrain", str(recipe.resolve()),
    ]


def test_layout_checked_before_writing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="n_heads"):
        write_sbatch(_recipe(tmp_path, tp=16), SlurmJob(nodes=2, gpus_per_node=8))
    with pytest.raises(UserError, match="does not divide the 6 processes"):
        write_sbatch(_recipe(tmp_path, tp=4), SlurmJob(nodes=2, gpus_per_node=3))
    with pytest.raises(UserError, match="--time"):
        SlurmJob(nodes=1, gpus_per_node=1, time="tomorrow")
    assert not (tmp_path / "runs" / "slurm-test" / "slurm" / "pretrain.sbatch").exists()


def test_submit_calls_sbatch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" > "$(dirname "$0")/sbatch.args"\necho "777;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["slurm", str(_recipe(tmp_path)), "--nodes", "2", "--gpus-per-node", "8", "--submit"])
    assert result.exit_code == 0, result.output
    assert "submitted job 777" in result.output
    script = tmp_path / "runs" / "slurm-test" / "slurm" / "pretrain.sbatch"
    assert (bin_dir / "sbatch.args").read_text().split() == ["--parsable", str(script)]


def test_eval_job_beside_training(tmp_path: Path, monkeypatch) -> None:
    """A recipe with eval tasks gets eval.sbatch: one GPU, `zagreus eval RUN --watch`, submitted to start
    after the training job has started; it waits for the run's recipe.yaml and requeues itself on USR1."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE % 1 + "eval: {tasks: [zagreus_arc_it]}\n")
    bin_dir = _fake_bin(tmp_path)
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$(dirname "$0")/sbatch.args"\n'
                                    'n=$(wc -l < "$(dirname "$0")/sbatch.args"); echo "$((776 + n));cluster"\n')
    (bin_dir / "zagreus").write_text(FAKE_SRUN.replace("srun.args", "zagreus.args"))
    for name in ("sbatch", "zagreus"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["slurm", str(recipe), "--nodes", "1", "--gpus-per-node", "2", "--submit",
                                      "--setup", "true"])
    assert result.exit_code == 0, result.output
    slurm_dir = tmp_path / "runs" / "slurm-test" / "slurm"
    assert "submitted job 777" in result.output and "submitted job 778 (eval, after 777)" in result.output
    assert (bin_dir / "sbatch.args").read_text().splitlines() == [
        f"--parsable {slurm_dir / 'pretrain.sbatch'}", f"--parsable --dependency=after:777 {slurm_dir / 'eval.sbatch'}"]
    script = slurm_dir / "eval.sbatch"
    lines = script.read_text().splitlines()
    for line in ("#SBATCH --job-name=slurm-test-eval", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"):
        assert line in lines, line

    # The job waits for the training job to write the run's recipe, then watches; USR1 requeues it.
    log = tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "FAKE_LOG": str(log), "SLURM_JOB_ID": "778"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)
    assert not (log / "zagreus.args").exists()  # no recipe.yaml yet: still waiting
    (slurm_dir.parent / "recipe.yaml").write_text(recipe.read_text())
    deadline = time.time() + 60
    while not (log / "zagreus.args").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (log / "zagreus.args").read_text().split() == [
        "eval", str(slurm_dir.parent), "--watch", "--device", "auto", "--idle-timeout", "21600"]
    proc.send_signal(signal.SIGUSR1)
    deadline = time.time() + 30
    while not (log / "scontrol.log").exists() and time.time() < deadline:
        time.sleep(0.05)
    (log / "stop").touch()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (log / "scontrol.log").read_text().split() == ["requeue", "778"]


def test_cpu_job_and_post_training_scripts(tmp_path: Path, monkeypatch) -> None:
    """--gpus-per-node 0: no GPU line, torchrun --nproc-per-node N, one CPU per process; eval on one CPU with
    --device cpu; sft and dpo jobs run torchrun like pretraining, chained afterok on --submit."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE % 1 + "eval: {tasks: [zagreus_arc_it]}\n"
                      "sft: {seq_len: 256, datasets: [{path: chat.jsonl}]}\n"
                      "dpo: {seq_len: 256, datasets: [{path: prefs.jsonl}]}\n")
    for name in ("chat.jsonl", "prefs.jsonl"):
        (tmp_path / name).write_text("")
    with pytest.raises(UserError, match="--nproc-per-node"):
        SlurmJob(nodes=1, gpus_per_node=0)
    bin_dir = _fake_bin(tmp_path)
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$(dirname "$0")/sbatch.args"\n'
                                    'n=$(wc -l < "$(dirname "$0")/sbatch.args"); echo "$((776 + n))"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "0",
                                      "--nproc-per-node", "4", "--setup", "true", "--submit"])
    assert result.exit_code == 0, result.output
    slurm_dir = tmp_path / "runs" / "slurm-test" / "slurm"
    pretrain = (slurm_dir / "pretrain.sbatch").read_text()
    assert "--gpus-per-node" not in pretrain and "  --nproc-per-node=4 \\" in pretrain.splitlines()
    assert "#SBATCH --cpus-per-task=4" in pretrain.splitlines() and "(gloo)" in pretrain
    evaluation = (slurm_dir / "eval.sbatch").read_text()
    assert "--gpus-per-node" not in evaluation and "#SBATCH --cpus-per-task=1" in evaluation.splitlines()
    assert "--watch --device cpu" in evaluation
    for stage in ("sft", "dpo"):
        lines = (slurm_dir / f"{stage}.sbatch").read_text().splitlines()
        for line in (f"#SBATCH --job-name=slurm-test-{stage}", "#SBATCH --nodes=2", "#SBATCH --cpus-per-task=4",
                     "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "trap requeue USR1",
                     "  --nproc-per-node=4 \\", f"  -m zagreus.cli {stage} {recipe.resolve()} &"):
            assert line in lines, (stage, line)
        assert subprocess.run(["bash", "-n", str(slurm_dir / f"{stage}.sbatch")]).returncode == 0
    assert (bin_dir / "sbatch.args").read_text().splitlines() == [
        f"--parsable {slurm_dir / 'pretrain.sbatch'}", f"--parsable --dependency=after:777 {slurm_dir / 'eval.sbatch'}",
        f"--parsable --dependency=afterok:777 {slurm_dir / 'sft.sbatch'}",
        f"--parsable --dependency=afterok:779 {slurm_dir / 'dpo.sbatch'}"]
    assert "submitted job 779 (sft, afterok 777)" in result.output and "submitted job 780 (dpo, afterok 779)" in result.output

    # On GPUs the post-training jobs take the job's GPUs; --stage picks the jobs (dpo alone: no dependency).
    scripts = write_sbatch(recipe, SlurmJob(nodes=1, gpus_per_node=8), stages=["dpo"])
    assert scripts.pretrain is None and scripts.eval is None and scripts.sft is None
    assert {"#SBATCH --gpus-per-node=8", "  --nproc-per-node=8 \\"} <= set(scripts.dpo.read_text().splitlines())
    bad = tmp_path / "tp.yaml"
    bad.write_text(recipe.read_text().replace("dpo: {", "dpo: {parallel: {pp: 2}, "))
    with pytest.raises(UserError, match="dpo.parallel.pp: pipeline parallelism is for pretraining"):
        write_sbatch(bad, SlurmJob(nodes=1, gpus_per_node=8), stages=["dpo"])
    with pytest.raises(UserError, match="no 'sft:' section"):
        write_sbatch(_recipe(tmp_path), SlurmJob(nodes=1, gpus_per_node=8), stages=["sft"])
