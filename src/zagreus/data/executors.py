"""The tokenize stage on datatrove's executors (LocalPipelineExecutor, SlurmPipelineExecutor,
RayPipelineExecutor).

Two datatrove pipeline steps wrap our stages: `StageStep` for the parallel ones (signatures,
buckets, units; task `rank` of `world` takes every world-th item of the fixed plan, so the output
does not depend on the number of tasks) and `SerialStep` for the single-task ones (clusters,
finalize). On Slurm each stage is a job array depending on the one before (afterok);
`zagreus data tokenize` waits for them (squeue) or, with `--no-wait`, prints their job ids and returns. `--dry-run` goes through
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

from zagreus.data.dedup import cluster
from zagreus.data.pipeline import StageTasks, available_cores, finalize
from zagreus.data.plan import Plan
from zagreus.errors import UserError
from zagreus.recipe import ExecutorSection


class StageStep(PipelineStep):
    """One parallel stage (signatures, buckets or units) for one datatrove task: task `rank` of
    `world` takes the units rank, rank + world, ... (round-robin over the fixed plan, so the output
    does not depend on the number of tasks), or for buckets the rank-th range of keys."""

    name = "zagreus data stage"
    type = "Tokenizer"

    def __init__(self, data_dir: str, plan_hash: str, stage: str, threads: int):
        super().__init__()
        self.data_dir, self.plan_hash, self.stage, self.threads = data_dir, plan_hash, stage, threads
        self.name = f"zagreus {stage}"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        tasks = StageTasks(Plan.load(Path(self.data_dir), self.plan_hash), self.threads, world_size)
        items = range(world_size) if self.stage == "buckets" else range(len(tasks.plan.units))
        for item in items[rank::world_size]:
            tasks.run(self.stage, item)
        return None


class SerialStep(PipelineStep):
    """A single-task stage: clusters (out of `world` bucket tasks) or finalize."""

    name = "zagreus serial stage"
    type = "Writer"

    def __init__(self, data_dir: str, plan_hash: str, stage: str, world: int = 1):
        super().__init__()
        self.data_dir, self.plan_hash, self.stage, self.world = data_dir, plan_hash, stage, world
        self.name = f"zagreus {stage}"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        plan = Plan.load(Path(self.data_dir), self.plan_hash)
        if self.stage == "clusters":
            cluster(plan, self.world)
        else:
            finalize(plan)
        return None


def run_stage(plan: Plan, cfg: ExecutorSection, logging_dir: Path, stage: str) -> None:
    """A parallel stage on datatrove's LocalPipelineExecutor (`kind: datatrove`) or RayPipelineExecutor
    (`kind: ray`); the single-task stages run in this process.

    Ray: joins the cluster this process is connected to, else the one RAY_ADDRESS names, else starts a
    local one (`ray.init()`). Every node must see the data folder at the same path (a shared
    filesystem), as Slurm's nodes do."""
    # Our own files are the completion markers; datatrove's per-rank markers would wrongly skip a
    # rank after the number of tasks changed, so they are not used.
    common = dict(tasks=cfg.task_count, workers=cfg.workers, logging_dir=str(logging_dir / stage), skip_completed=False)
    if cfg.kind == "ray":
        try:
            import ray
            from datatrove.executor.ray import RayPipelineExecutor
        except ImportError:
            raise UserError("data.executor.kind: ray needs the ray package: pip install 'ray>=2.40'") from None
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        step = StageStep(str(plan.data_dir), plan.hash, stage, max(1, cfg.cpus_per_task))
        RayPipelineExecutor([step], cpus_per_task=cfg.cpus_per_task, mem_per_cpu_gb=cfg.mem_per_cpu_gb, **common).run()
        return
    step = StageStep(str(plan.data_dir), plan.hash, stage, max(1, available_cores() // cfg.workers))
    LocalPipelineExecutor([step], **common).run()


def slurm_executors(plan: Plan, cfg: ExecutorSection, logging_dir: Path) -> list[SlurmPipelineExecutor]:
    """The stage's job arrays, each depending on the one before: [signatures, buckets, clusters,]
    units, finalize."""
    if not cfg.partition:
        raise ValueError("data.executor.partition is required for kind: slurm")
    env = cfg.env_command or f"source {Path(sys.prefix) / 'bin' / 'activate'}"
    # sbatch wants an integer amount: a fractional "2.5G" would be rejected, so pass megabytes.
    common = dict(time=cfg.time, partition=cfg.partition, cpus_per_task=cfg.cpus_per_task, env_command=env,
                  sbatch_args={"mem-per-cpu": f"{round(cfg.mem_per_cpu_gb * 1024)}M"}, skip_completed=True)
    data_dir, world = str(plan.data_dir), cfg.task_count
    steps = [(stage, StageStep(data_dir, plan.hash, stage, cfg.cpus_per_task), world)
             for stage in (("signatures", "buckets") if plan.dedup else ())]
    if plan.dedup:
        steps.append(("clusters", SerialStep(data_dir, plan.hash, "clusters", world), 1))
    steps += [("units", StageStep(data_dir, plan.hash, "units", cfg.cpus_per_task), world),
              ("finalize", SerialStep(data_dir, plan.hash, "finalize"), 1)]
    jobs: list[SlurmPipelineExecutor] = []
    for stage, step, tasks in steps:
        jobs.append(SlurmPipelineExecutor([step], tasks=tasks, workers=cfg.workers if tasks > 1 else -1,
                                          job_name=f"{cfg.job_name}-{stage}", depends=jobs[-1] if jobs else None,
                                          logging_dir=str(logging_dir / stage), **common))
    return jobs


def launch_slurm(plan: Plan, cfg: ExecutorSection, logging_dir: Path, dry_run: bool) -> list[str]:
    """Submit (or, dry-run, only render) the Slurm jobs; returns the sbatch scripts."""
    final = slurm_executors(plan, cfg, logging_dir)[-1]
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
    """Submit the job arrays (each afterok the one before); returns job name -> id, leaving out a job
    whose tasks were all complete already (datatrove then submits nothing)."""
    jobs = slurm_executors(plan, cfg, logging_dir)
    jobs[-1].run()
    return {ex.job_name: str(ex.job_id) for ex in jobs if ex.job_id not in (None, -1)}


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
