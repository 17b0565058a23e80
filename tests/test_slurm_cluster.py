"""`zagreus slurm` and the Slurm data executor on a real one-node Slurm (tests/slurm_fixture.py).

- A CPU pretraining job (1 node, 2 torchrun processes, dp_shard 2) submitted with `zagreus slurm
  --submit`, requeued with `scontrol requeue` after its first checkpoint: Slurm's SIGTERM reaches
  torchrun's workers, which save the step in flight; the job restarts (SLURM_RESTART_COUNT 1) and
  resumes. Every logged loss and gradient norm is bitwise equal to an uninterrupted torchrun run,
  each step logged once.
- Training plus its dependent evaluation job (after:TRAINING): the progression table holds the
  kept checkpoints' rows when both end.
- An sft job submitted afterok the training job runs `zagreus sft` to its export.
- `zagreus data tokenize` with data.executor.kind slurm: datatrove's job arrays, one per stage
  (signatures, buckets, clusters, units, finalize), each afterok the one before, then the shards byte-identical to the local executor's; `--no-wait` prints
  the job ids.

They skip without Slurm (slurm-wlm, munge) or root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_fixture import slurm_cluster  # noqa: F401  (a module fixture)
from test_parallel_pretrain import data_dir, make_recipe, torchrun  # noqa: F401  (data_dir is a module fixture)

pytestmark = pytest.mark.slow

STEPS = 300  # ~10-20 steps/s on 2 CPU processes: the requeue lands mid-run even on a machine several times faster


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)  # `zagreus` and `torchrun` of this venv, as the jobs see them
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
            "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def zagreus(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "zagreus.cli", *args], env=_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done


def submitted(out: str) -> dict[str, str]:
    """`zagreus slurm --submit` output -> stage: job id."""
    ids = {}
    for line in out.splitlines():
        if line.startswith("submitted job "):
            words = line.split()
            ids[words[3].strip("(,)") if len(words) > 3 else "pretrain"] = words[2]
    return ids


def recipe(data: Path, run: Path, steps: int, **extra) -> Path:
    path = make_recipe(data, run, steps=steps, dp_shard=2)
    body = yaml.safe_load(path.read_text())
    body["pretrain"].update(checkpoint={"every": 10, "keep": 2}, peak_flops=1e12, eval_every=10_000)
    body.update(extra)
    path.write_text(yaml.safe_dump(body))
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_log(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))


def test_requeued_pretraining_loses_nothing(slurm_cluster, data_dir, tmp_path):
    run = tmp_path / "slurm-run"
    path = recipe(data_dir, run, STEPS)
    out = zagreus("slurm", str(path), "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2", "--submit",
                  cwd=tmp_path).stdout
    job = submitted(out)["pretrain"]
    script = (run / "slurm" / "pretrain.sbatch").read_text()
    assert "--gpus-per-node" not in script and "--nproc-per-node=2" in script and "#SBATCH --cpus-per-task=2" in script

    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and slurm_cluster.state(job) in ("PENDING", "RUNNING"), train_log(run)
        time.sleep(0.1)
    slurm_cluster.run("scontrol", "requeue", job)
    slurm_cluster.wait_state(job, {"PENDING"}, timeout=60)
    # Slurm holds a requeued job for 120 s (BeginTime); let it start again at once.
    slurm_cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now")
    assert slurm_cluster.wait_end(job, timeout=180)[job] == "COMPLETED", train_log(run) + slurm_cluster.logs()

    reference = tmp_path / "reference"  # the uninterrupted run
    torchrun(2, recipe(data_dir, reference, STEPS))
    log = train_log(run)
    assert slurm_cluster.job(job)["Restarts"] == "1"
    assert "(restart 0)" in log and "(restart 1)" in log, log
    stopped = [line for line in log.splitlines() if "stopped by SIGTERM at step" in line]
    assert len(stopped) == 2, log  # both ranks saved the step in flight
    stop_step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert 0 < stop_step < STEPS and f"starting at step {stop_step}" in log, log

    got = [r for r in records(run) if "loss" in r]
    want = [r for r in records(reference) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no step missing or doubled
    for a, b in zip(got, want):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])


def test_training_then_eval_and_sft_jobs(slurm_cluster, data_dir, tmp_path):
    """pretrain; eval --watch after:pretrain (1 CPU); sft afterok:pretrain (2 CPU processes under torchrun)."""
    from test_eval_lm import write_arc_task_files

    bench = write_arc_task_files(tmp_path / "bench", n_test=8, n_val=2)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"quanto fa {i} più {i}?", "completion": f"fa {2 * i}."}) + "\n"
                          for i in range(6)))
    run = tmp_path / "pipeline"
    path = recipe(data_dir, run, 20, eval={"tasks": ["zagreus_arc_it"], "data_dir": str(bench), "limit": 8},
                  sft={"seq_len": 64, "micro_batch": 2, "epochs": 1, "datasets": [{"path": str(qa)}],
                       "packing": False, "log_every": 1, "checkpoint": {"every": 2, "keep": 1}, "device": "cpu"})
    out = zagreus("slurm", str(path), "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2", "--submit",
                  cwd=tmp_path).stdout
    jobs = submitted(out)
    assert set(jobs) == {"pretrain", "eval", "sft"}, out
    assert f"(eval, after {jobs['pretrain']})" in out and f"(sft, afterok {jobs['pretrain']})" in out, out
    for name, cpus in (("eval", 1), ("sft", 2)):
        lines = (run / "slurm" / f"{name}.sbatch").read_text().splitlines()
        assert f"#SBATCH --cpus-per-task={cpus}" in lines and not any("--gpus-per-node" in line for line in lines)
    assert "--device cpu" in (run / "slurm" / "eval.sbatch").read_text()

    ended = slurm_cluster.wait_end(*jobs.values(), timeout=240)
    assert set(ended.values()) == {"COMPLETED"}, (ended, train_log(run), slurm_cluster.logs())
    table = (run / "eval" / "progression.md").read_text(encoding="utf-8")
    assert "| step-10 |" in table and "| step-20 |" in table, table
    assert (run / "sft" / "export" / "config.json").is_file()
    summary = json.loads((run / "sft" / "summary.json").read_text())
    assert summary["init"] == str(run) and summary["ranks"] == 2
    finished = {r["JobID"]: r for r in slurm_cluster.completed()}
    assert all(finished[job_id]["State"] == "COMPLETED" for job_id in jobs.values()), finished


def test_data_tokenize_on_slurm_equals_local(slurm_cluster, handbook_path, tmp_path):
    """datatrove's job arrays (2 tasks each) for every stage, each afterok the one before; the shards
    equal the local executor's."""
    from test_data_pipeline import LLAMA3, handbook_docs, output_bytes, write_jsonl

    from zagreus.data.stage import tokenize_data
    from zagreus.recipe import DataSection

    corpus = write_jsonl(tmp_path / "hb.jsonl", handbook_docs(handbook_path, 10))
    data = {"sources": [{"name": "hb", "path": str(corpus)}], "unit_bytes": 32 << 10, "shard_tokens": 10_000,
            "validation_fraction": 0.2}
    run = tmp_path / "data-run"
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"name": "data-run", "run_dir": str(run), "tokenizer": {"kind": "llama3"}, "data": {
        **data, "executor": {"kind": "slurm", "partition": "debug", "tasks": 2, "workers": 2, "mem_per_cpu_gb": 0.5,
                             "time": "0:10:00"}}}))
    out = zagreus("data", "tokenize", str(path), "--no-wait", cwd=tmp_path).stdout
    jobs = submitted(out)
    # exact dedup (the default filters) runs first: signatures, buckets, clusters, then units, finalize
    chain = ["signatures", "buckets", "clusters", "units", "finalize"]
    assert list(jobs) == [f"zagreus-data-{stage}" for stage in chain], out
    ids = [jobs[f"zagreus-data-{stage}"] for stage in chain]
    for before, after in zip(ids, ids[1:]):
        assert f"afterok:{before}" in slurm_cluster.job(after)["Dependency"]  # each job waits on the one before
    assert not (run / "data" / "manifest.json").exists()

    local = tmp_path / "local"
    tokenize_data(DataSection(**data, executor={"kind": "local", "workers": 1}), local, LLAMA3, show_progress=False)
    arrays = {stage: job for stage, job in zip(chain, ids) if stage in ("signatures", "buckets", "units")}
    states = slurm_cluster.wait_end(*[f"{job}_{t}" for job in arrays.values() for t in (0, 1)],
                                    jobs["zagreus-data-clusters"], jobs["zagreus-data-finalize"], timeout=240)
    assert set(states.values()) == {"COMPLETED"}, (states, slurm_cluster.logs())
    got = output_bytes(run / "data")
    assert len([k for k in got if k.endswith(".ds")]) >= 2
    assert got == output_bytes(local)
    finished = {r["JobID"]: r["State"] for r in slurm_cluster.completed()}
    for stage, job in arrays.items():  # every array really ran as two tasks
        tasks = slurm_cluster.array_tasks(job)
        assert sorted(tasks) == ["0", "1"], (stage, tasks)
        assert [finished[tasks["0"]], finished[tasks["1"]]] == ["COMPLETED"] * 2, (stage, finished)

    # Without --no-wait the command waits for the jobs, then reports the manifest.
    waited = tmp_path / "data-waited"
    path.write_text(path.read_text().replace(str(run), str(waited)))
    out = zagreus("data", "tokenize", str(path), cwd=tmp_path)
    assert f"wrote {waited / 'data'}" in out.stdout and "submitted job" in out.stderr, out.stdout + out.stderr
    assert output_bytes(waited / "data") == output_bytes(local)
