"""The tokenize stage on datatrove's executors (LocalPipelineExecutor, SlurmPipelineExecutor,
RayPipelineExecutor).

Two datatrove pipeline steps wrap our phases: `TokenizeUnits` (task `rank` of `world` processes
the work units rank, rank + world, ... — round-robin over the fixed plan, so the output does not
depend on the number of tasks) and `FinalizeShards` (one task: dedup, budget, shards, manifest).
On Slurm they become two job arrays, the second depending on the first; `zagreus data tokenize` waits
for them (squeue) or, with `--no-wait`, prints their job ids and returns. `--dry-run` goes through
datatrove's real launch path with `sbatch` replaced by printing, so what is shown is exactly what
would be submitted.

Datatrove's local executor starts its workers with `forkserver`, which re-imports the main
module: a script driving it needs an `if __name__ == "__main__":` guard (the CLI has one).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from zagreus.data.pipeline import Plan, UnitProcessor, available_cores, finalize
from zagreus.errors import UserError
from zagreus.recipe import ExecutorSection


class TokenizeUnits(PipelineStep):
    """Phase 2 for one datatrove task."""

    name = "zagreus tokenize units"
    type = "Tokenizer"

    def __init__(self, data_dir: str, plan_hash: str, threads: int):
        super().__init__()
        self.data_dir, self.plan_hash, self.threads = data_dir, plan_hash, threads

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        processor = UnitProcessor(Plan.load(Path(self.data_dir), self.plan_hash), threads=self.threads)
        processor.run_ranks(rank, world_size)
        return None


class FinalizeShards(PipelineStep):
    """Phase 3 (a single task)."""

    name = "zagreus finalize shards"
    type = "Writer"

    def __init__(self, data_dir: str, plan_hash: str):
        super().__init__()
        self.data_dir, self.plan_hash = data_dir, plan_hash

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        finalize(Plan.load(Path(self.data_dir), self.plan_hash))
        return None


def run_datatrove_local(plan: Plan, cfg: ExecutorSection, logging_dir: Path) -> None:
    """Units under LocalPipelineExecutor; finalize in this process (it is one task anyway)."""
    # Unit files are our completion markers; datatrove's per-rank markers would wrongly skip a
    # rank after the number of tasks changed, so they are not used.
    threads = max(1, available_cores() // cfg.workers)
    executor = LocalPipelineExecutor([TokenizeUnits(str(plan.data_dir), plan.hash, threads)], tasks=cfg.task_count,
                                     workers=cfg.workers, logging_dir=str(logging_dir / "units"), skip_completed=False)
    executor.run()


def run_ray(plan: Plan, cfg: ExecutorSection, logging_dir: Path) -> None:
    """Units as tasks of datatrove's RayPipelineExecutor; finalize in this process, as for `datatrove`.

    Joins the Ray cluster this process is connected to, else the one RAY_ADDRESS names, else starts a
    local one (`ray.init()`). Every node must see the data folder at the same path (a shared
    filesystem), as Slurm's nodes do."""
    try:
        import ray
        from datatrove.executor.ray import RayPipelineExecutor
    except ImportError:
        raise UserError("data.executor.kind: ray needs the ray package: pip install 'ray>=2.40'") from None
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    threads = max(1, cfg.cpus_per_task)
    executor = RayPipelineExecutor([TokenizeUnits(str(plan.data_dir), plan.hash, threads)], tasks=cfg.task_count,
                                   workers=cfg.workers, logging_dir=str(logging_dir / "units"), skip_completed=False,
                                   cpus_per_task=cfg.cpus_per_task, mem_per_cpu_gb=cfg.mem_per_cpu_gb)
    executor.run()


def slurm_executors(plan: Plan, cfg: ExecutorSection, logging_dir: Path) -> tuple[SlurmPipelineExecutor, SlurmPipelineExecutor]:
    if not cfg.partition:
        raise ValueError("data.executor.partition is required for kind: slurm")
    env = cfg.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}"
    # sbatch wants an integer amount: a fractional "2.5G" would be rejected, so pass megabytes.
    common = dict(time=cfg.time, partition=cfg.partition, cpus_per_task=cfg.cpus_per_task, env_command=env,
                  sbatch_args={"mem-per-cpu": f"{round(cfg.mem_per_cpu_gb * 1024)}M"}, skip_completed=True)
    units = SlurmPipelineExecutor([TokenizeUnits(str(plan.data_dir), plan.hash, cfg.cpus_per_task)], tasks=cfg.task_count,
                                  workers=cfg.workers, job_name=f"{cfg.job_name}-units",
                                  logging_dir=str(logging_dir / "units"), **common)
    final = SlurmPipelineExecutor([FinalizeShards(str(plan.data_dir), plan.hash)], tasks=1,
                                  job_name=f"{cfg.job_name}-finalize", depends=units,
                                  logging_dir=str(logging_dir / "finalize"), **common)
    return units, final


def launch_slurm(plan: Plan, cfg: ExecutorSection, logging_dir: Path, dry_run: bool) -> list[str]:
    """Submit (or, dry-run, only render) the two Slurm jobs; returns the sbatch scripts."""
    _, final = slurm_executors(plan, cfg, logging_dir)
    scripts: list[str] = []
    if not dry_run:
        final.run()
        return scripts

    def fake_sbatch(contents: str, job_id_retriever, *args) -> str:
        flags = " ".join(args)
        scripts.append(f"# sbatch {flags}\n{contents}".rstrip() + "\n")
        return str(1000 + len(scripts))  # a stand-in job id so the dependency line is rendered

    with mock.patch("datatrove.executor.slurm.launch_slurm_job", fake_sbatch):
        final.run()
    return scripts


def submit_slurm(plan: Plan, cfg: ExecutorSection, logging_dir: Path) -> dict[str, str]:
    """Submit the two job arrays (finalize afterok units); returns job name -> id, leaving out a job
    whose tasks were all complete already (datatrove then submits nothing)."""
    units, final = slurm_executors(plan, cfg, logging_dir)
    final.run()
    return {ex.job_name: str(ex.job_id) for ex in (units, final) if ex.job_id not in (None, -1)}


_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
           "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


def wait_slurm(job_ids: list[str], poll: float = 2.0) -> None:
    """Return when no task of the jobs is pending or running (squeue); a job that can never start (a job
    it depends on failed) is cancelled and reported."""
    while job_ids:
        done = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                              capture_output=True, text=True)
        if done.returncode != 0 and "Invalid job id" not in done.stderr:
            raise UserError(f"squeue -j {','.join(job_ids)} failed: {done.stderr.strip()}")
        rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 2]
        stuck = sorted({job for job, state, reason in rows if state == "PENDING" and "DependencyNeverSatisfied" in reason})
        if stuck:
            subprocess.run(["scancel", *stuck], capture_output=True)
            raise UserError(f"Slurm job(s) {', '.join(stuck)} can never start: a job they depend on failed "
                            "(cancelled them; see the logs folder)")
        if not any(state in _ACTIVE for _, state, _ in rows):
            return
        time.sleep(poll)
