"""Slurm jobs of a recipe: multi-node pretraining, SFT and DPO (torchrun on every node), and the
one-device job beside pretraining that scores every checkpoint as it is saved.

One task per node; torchrun starts one process per GPU (or `--nproc-per-node` CPU processes on a
CPU job, gloo) and rendezvouses with the other nodes through its c10d backend on the first node of
the allocation (`scontrol show hostnames`), so no port or address is fixed at submission time.
Every job is requeueable: Slurm signals the batch shell (USR1) a few minutes before the time
limit, the trap requeues the job, Slurm ends it with SIGTERM to every process of the job
(torchrun's workers included: they save the step in flight), and when it starts again the stage
resumes from the run's latest checkpoint by itself.

`--submit` chains them: pretrain; eval after:pretrain (it starts once training has, and watches);
sft afterok:pretrain; dpo afterok:sft (each on the previous stage submitted in the same call).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from zagreus.errors import UserError
from zagreus.post.ranks import post_dims
from zagreus.recipe import Recipe, load_recipe
from zagreus.train.parallel import ParallelDims

RDZV_PORT = 29500
EVAL_IDLE_SECONDS = 6 * 3600  # the watcher gives up when no checkpoint came for this long (training died)
STAGES = ("pretrain", "sft", "dpo")
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass(frozen=True)
class SlurmJob:
    """What the sbatch scripts need besides the recipe."""

    nodes: int
    gpus_per_node: int  # 0: a CPU job (no GRES line, gloo, --device cpu)
    partition: str | None = None
    time: str = "24:00:00"
    account: str | None = None
    cpus_per_node: int | None = None  # default on a CPU job: one CPU per process
    signal_seconds: int = 300
    setup: str | None = None  # shell line run before torchrun, e.g. activating an environment
    nproc_per_node: int | None = None  # torchrun processes per node; default the GPU count

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise UserError(f"--nodes {self.nodes} --gpus-per-node {self.gpus_per_node}: nodes must be 1 or more, "
                            "GPUs 0 (a CPU job) or more")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise UserError(f"--nproc-per-node {self.nproc_per_node}: must be 1 or more")
        if self.gpus_per_node == 0 and self.nproc_per_node is None:
            raise UserError("--gpus-per-node 0 is a CPU job: give its processes per node with --nproc-per-node N")
        if not _TIME.match(self.time):
            raise UserError(f"--time {self.time!r}: use Slurm's format, e.g. 24:00:00 or 2-00:00:00")

    @property
    def cpu(self) -> bool:
        return self.gpus_per_node == 0

    @property
    def procs(self) -> int:
        """torchrun's processes per node."""
        return self.nproc_per_node if self.nproc_per_node is not None else self.gpus_per_node

    @property
    def device(self) -> str:
        """--device of the single-process jobs."""
        return "cpu" if self.cpu else "auto"


def default_setup() -> str | None:
    """Activate the virtual environment this command runs in, so the nodes use the same install."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file():
        return f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"
    return None


def _check_device(recipe_path: Path, section: str, device: str, job: SlurmJob) -> None:
    if job.cpu and device == "cuda":
        raise UserError(f"{recipe_path}: {section}.device is cuda but --gpus-per-node 0 is a CPU job; "
                        f"set {section}.device: auto (or cpu), or give the job GPUs")


def check_layout(recipe_path: Path, job: SlurmJob) -> None:
    """The recipe's parallel degrees must fit nodes x processes now, not after hours in the queue."""
    recipe = load_recipe(recipe_path)
    p = recipe.pretrain.parallel
    dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.tp, p.pp, world_size=job.nodes * job.procs)
    dims.check_model(recipe.model.resolve(), recipe.pretrain.seq_len)
    dims.check_features(recipe.pretrain.activation_checkpointing, recipe.pretrain.compile)
    _tp_within_node(recipe_path, "pretrain", dims.tp, job)
    _check_device(recipe_path, "pretrain", recipe.pretrain.device, job)


def _tp_within_node(recipe_path: Path, section: str, tp: int, job: SlurmJob) -> None:
    if tp > job.procs:
        unit = "CPU processes" if job.cpu else "GPUs"
        raise UserError(f"{recipe_path}: {section}.parallel.tp = {tp} spans nodes ({job.procs} {unit} each); "
                        f"keep tp within a node (tp <= {job.procs})")


def _head(name: str, nodes: int, gpus_per_node: int, log_dir: Path, job: SlurmJob, cpus: int | None = None) -> list[str]:
    """The #SBATCH lines of a requeueable job (USR1 to the batch shell before the time limit); no GPU
    line when gpus_per_node is 0; `cpus` is the CPU job's default of --cpus-per-task."""
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if gpus_per_node:
        head.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    head += [
        f"#SBATCH --time={job.time}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{job.signal_seconds}",
        f"#SBATCH --output={log_dir.resolve()}/%x-%j.out",
        "#SBATCH --open-mode=append",
    ]
    if job.partition:
        head.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        head.append(f"#SBATCH --account={job.account}")
    if job.cpus_per_node or cpus:
        head.append(f"#SBATCH --cpus-per-task={job.cpus_per_node or cpus}")
    return head


def _prologue(workdir: Path, job: SlurmJob, what: str) -> str:
    return f"""
# Written by `zagreus slurm`: {what}.
set -euo pipefail
cd {shlex.quote(str(workdir.resolve()))}
{job.setup or '# (no environment to activate)'}
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}
"""


# Near the time limit Slurm sends USR1 to the batch shell: requeue, and the next start picks up
# where this one stopped (pretraining from its latest checkpoint, the watcher from its cached scores).
# The command runs in the background so that the trap runs while it goes on; `wait` returns early
# when the trap fires, so wait again until the command ends (or is stopped).
_REQUEUE_AND_WAIT = """
requeue() {{
  echo "USR1: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
}}
trap requeue USR1

{command} &
child=$!
while true; do
  status=0
  wait "$child" || status=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"
"""


def render_sbatch(recipe_path: Path, name: str, log_dir: Path, workdir: Path, job: SlurmJob,
                  stage: str = "pretrain") -> str:
    """A training stage's job script (pretrain, sft or dpo; paths absolute, so it can be submitted from anywhere)."""
    recipe_arg = shlex.quote(str(recipe_path.resolve()))
    command = f"""srun --kill-on-bad-exit=1 torchrun \\
  --nnodes="$SLURM_JOB_NUM_NODES" \\
  --nproc-per-node={job.procs} \\
  --rdzv-id="$SLURM_JOB_ID" \\
  --rdzv-backend=c10d \\
  --rdzv-endpoint="$head_node:{RDZV_PORT}" \\
  -m zagreus.cli {stage} {recipe_arg}"""
    what = (f"{stage} on {job.nodes} node(s) x {job.procs} CPU process(es) (gloo), one torchrun per node" if job.cpu
            else f"{stage} on {job.nodes} node(s) x {job.gpus_per_node} GPU(s), one torchrun per node")
    body = _prologue(workdir, job, what) + f"""
# Rendezvous on the first node of the allocation (c10d store hosted by its torchrun).
# (No `| head -n 1`: with pipefail, scontrol's SIGPIPE on a long node list would end the job.)
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${{nodes[0]}}
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, rendezvous $head_node:{RDZV_PORT}"
""" + _REQUEUE_AND_WAIT.format(command=command)
    job_name = name if stage == "pretrain" else f"{name}-{stage}"
    head = _head(job_name, job.nodes, job.gpus_per_node, log_dir, job, cpus=job.procs if job.cpu else None)
    return "\n".join(head) + "\n" + body


def _one_device(job: SlurmJob) -> str:
    return "one CPU" if job.cpu else "one GPU"


def render_eval_sbatch(run_dir: Path, name: str, log_dir: Path, workdir: Path, job: SlurmJob) -> str:
    """The evaluation job's script: one GPU (one CPU on a CPU job), `zagreus eval RUN --watch` beside the
    training job (submitted with --dependency=after:TRAINING, so it starts once training has), scoring
    each checkpoint as it lands."""
    run_arg = shlex.quote(str(run_dir))
    command = f"zagreus eval {run_arg} --watch --device {job.device} --idle-timeout {EVAL_IDLE_SECONDS}"
    body = _prologue(workdir, job, f"{_one_device(job)} scoring every checkpoint of the training job as it is saved") + f"""
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) watching {run_arg}"
# The tasks come from the run's recipe.yaml, which the training job writes when it starts.
waited=0
until [ -f {run_arg}/recipe.yaml ]; do
  if [ "$waited" -ge {EVAL_IDLE_SECONDS} ]; then echo "no {run_arg}/recipe.yaml after {EVAL_IDLE_SECONDS} s"; exit 1; fi
  sleep 5; waited=$((waited + 5))
done
""" + _REQUEUE_AND_WAIT.format(command=command)
    head = _head(f"{name}-eval", 1, 0 if job.cpu else 1, log_dir, job, cpus=1 if job.cpu else None)
    return "\n".join(head) + "\n" + body


@dataclass(frozen=True)
class Scripts:
    pretrain: Path | None
    eval: Path | None  # None when the recipe names no eval tasks (or pretraining is not among the stages)
    sft: Path | None = None
    dpo: Path | None = None


def configured_stages(recipe: Recipe) -> list[str]:
    """pretrain, then sft and dpo when the recipe has their sections."""
    return ["pretrain"] + [s for s in ("sft", "dpo") if getattr(recipe, s) is not None]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def write_sbatch(recipe_path: Path, job: SlurmJob, out: Path | None = None, stages: list[str] | None = None) -> Scripts:
    """Check the layout, write <run>/slurm/pretrain.sbatch (or `out`) and, when the recipe has eval
    tasks, eval.sbatch beside it; sft.sbatch and dpo.sbatch for those stages. `stages` defaults
    to pretrain plus the post-training stages the recipe configures."""
    recipe = load_recipe(recipe_path)
    stages = list(stages) if stages else configured_stages(recipe)
    for stage in stages:
        if stage not in STAGES:
            raise UserError(f"--stage {stage}: choose pretrain, sft or dpo")
        if stage != "pretrain":
            if getattr(recipe, stage) is None:
                raise UserError(f"--stage {stage}: {recipe_path} has no '{stage}:' section")
            sec = getattr(recipe, stage)
            _check_device(recipe_path, stage, sec.device, job)
            _tp_within_node(recipe_path, stage, post_dims(stage, sec.parallel, job.nodes * job.procs).tp, job)
    if "pretrain" in stages:
        check_layout(recipe_path, job)
    workdir = Path.cwd()
    run_dir = recipe.run_path() if recipe.run_path().is_absolute() else workdir / recipe.run_path()
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    script = out or log_dir / "pretrain.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | None] = {"pretrain": None, "eval": None, "sft": None, "dpo": None}
    if "pretrain" in stages:
        written["pretrain"] = _write(script, render_sbatch(recipe_path, recipe.name, log_dir, workdir, job))
        if recipe.eval.tasks:
            written["eval"] = _write(script.with_name("eval.sbatch"),
                                     render_eval_sbatch(run_dir, recipe.name, log_dir, workdir, job))
    for stage in ("sft", "dpo"):
        if stage in stages:
            written[stage] = _write(script.with_name(f"{stage}.sbatch"),
                                    render_sbatch(recipe_path, recipe.name, log_dir, workdir, job, stage))
    return Scripts(**written)


def submit(script: Path, after: str | None = None, afterok: str | None = None) -> str:
    """sbatch the script (to start once job `after` has started, or once job `afterok` has ended well,
    if given); returns Slurm's job id."""
    if shutil.which("sbatch") is None:
        raise UserError(f"sbatch not found on PATH: run this on a Slurm login node, or submit {script} there yourself")
    dependency = [f"--dependency=after:{after}"] if after else []
    dependency += [f"--dependency=afterok:{afterok}"] if afterok else []
    done = subprocess.run(["sbatch", "--parsable", *dependency, str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch {script} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def submit_all(scripts: Scripts) -> list[tuple[str, str, str]]:
    """Submit the scripts in order, each post-training stage afterok the previous stage submitted, eval
    after pretrain; returns (stage, job id, dependency) in submission order."""
    submitted: list[tuple[str, str, str]] = []
    previous: str | None = None
    if scripts.pretrain:
        previous = submit(scripts.pretrain)
        submitted.append(("pretrain", previous, ""))
        if scripts.eval:
            submitted.append(("eval", submit(scripts.eval, after=previous), f"after:{previous}"))
    for stage in ("sft", "dpo"):
        script = getattr(scripts, stage)
        if script:
            job_id = submit(script, afterok=previous)
            submitted.append((stage, job_id, f"afterok:{previous}" if previous else ""))
            previous = job_id
    return submitted
