"""Multi-node pretraining under Slurm: an sbatch script running torchrun on every node, and the
one-GPU job beside it that scores every checkpoint as it is saved.

One task per node; torchrun starts one process per GPU and rendezvouses with the other nodes
through its c10d backend on the first node of the allocation (`scontrol show hostnames`), so
no port or address is fixed at submission time. The job is requeueable: Slurm signals the
batch shell (USR1) a few minutes before the time limit, the trap requeues the job, and when
it starts again `zagreus pretrain` resumes from the run's latest checkpoint by itself.
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
from zagreus.recipe import load_recipe
from zagreus.train.parallel import ParallelDims

RDZV_PORT = 29500
EVAL_IDLE_SECONDS = 6 * 3600  # the watcher gives up when no checkpoint came for this long (training died)
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass(frozen=True)
class SlurmJob:
    """What the sbatch script needs besides the recipe."""

    nodes: int
    gpus_per_node: int
    partition: str | None = None
    time: str = "24:00:00"
    account: str | None = None
    cpus_per_node: int | None = None
    signal_seconds: int = 300
    setup: str | None = None  # shell line run before torchrun, e.g. activating an environment

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise UserError(f"--nodes {self.nodes} --gpus-per-node {self.gpus_per_node}: both must be 1 or more")
        if not _TIME.match(self.time):
            raise UserError(f"--time {self.time!r}: use Slurm's format, e.g. 24:00:00 or 2-00:00:00")


def default_setup() -> str | None:
    """Activate the virtual environment this command runs in, so the nodes use the same install."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file():
        return f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"
    return None


def check_layout(recipe_path: Path, job: SlurmJob) -> None:
    """The recipe's parallel degrees must fit nodes x GPUs now, not after hours in the queue."""
    recipe = load_recipe(recipe_path)
    p = recipe.pretrain.parallel
    dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.tp, p.pp, world_size=job.nodes * job.gpus_per_node)
    dims.check_model(recipe.model.resolve(), recipe.pretrain.seq_len)
    dims.check_features(recipe.pretrain.activation_checkpointing, recipe.pretrain.compile)
    if dims.tp > job.gpus_per_node:
        raise UserError(f"{recipe_path}: pretrain.parallel.tp = {dims.tp} spans nodes ({job.gpus_per_node} GPUs each); "
                        f"keep tp within a node (tp <= {job.gpus_per_node})")


def _head(name: str, nodes: int, gpus_per_node: int, log_dir: Path, job: SlurmJob) -> list[str]:
    """The #SBATCH lines of a requeueable job (USR1 to the batch shell before the time limit)."""
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
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
    if job.cpus_per_node:
        head.append(f"#SBATCH --cpus-per-task={job.cpus_per_node}")
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


def render_sbatch(recipe_path: Path, name: str, log_dir: Path, workdir: Path, job: SlurmJob) -> str:
    """The pretraining job's script text (paths absolute, so it can be submitted from anywhere)."""
    recipe_arg = shlex.quote(str(recipe_path.resolve()))
    command = f"""srun --kill-on-bad-exit=1 torchrun \\
  --nnodes="$SLURM_JOB_NUM_NODES" \\
  --nproc-per-node={job.gpus_per_node} \\
  --rdzv-id="$SLURM_JOB_ID" \\
  --rdzv-backend=c10d \\
  --rdzv-endpoint="$head_node:{RDZV_PORT}" \\
  -m zagreus.cli pretrain {recipe_arg}"""
    body = _prologue(workdir, job, f"{job.nodes} node(s) x {job.gpus_per_node} GPU(s), one torchrun per node") + f"""
# Rendezvous on the first node of the allocation (c10d store hosted by its torchrun).
# (No `| head -n 1`: with pipefail, scontrol's SIGPIPE on a long node list would end the job.)
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${{nodes[0]}}
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, rendezvous $head_node:{RDZV_PORT}"
""" + _REQUEUE_AND_WAIT.format(command=command)
    return "\n".join(_head(name, job.nodes, job.gpus_per_node, log_dir, job)) + "\n" + body


def render_eval_sbatch(run_dir: Path, name: str, log_dir: Path, workdir: Path, job: SlurmJob) -> str:
    """The evaluation job's script: one GPU, `zagreus eval RUN --watch` beside the training job (submitted
    with --dependency=after:TRAINING, so it starts once training has), scoring each checkpoint as it lands."""
    run_arg = shlex.quote(str(run_dir))
    command = f"zagreus eval {run_arg} --watch --device auto --idle-timeout {EVAL_IDLE_SECONDS}"
    body = _prologue(workdir, job, "one GPU scoring every checkpoint of the training job as it is saved") + f"""
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) watching {run_arg}"
# The tasks come from the run's recipe.yaml, which the training job writes when it starts.
waited=0
until [ -f {run_arg}/recipe.yaml ]; do
  if [ "$waited" -ge {EVAL_IDLE_SECONDS} ]; then echo "no {run_arg}/recipe.yaml after {EVAL_IDLE_SECONDS} s"; exit 1; fi
  sleep 5; waited=$((waited + 5))
done
""" + _REQUEUE_AND_WAIT.format(command=command)
    return "\n".join(_head(f"{name}-eval", 1, 1, log_dir, job)) + "\n" + body


@dataclass(frozen=True)
class Scripts:
    pretrain: Path
    eval: Path | None  # None when the recipe names no eval tasks


def write_sbatch(recipe_path: Path, job: SlurmJob, out: Path | None = None) -> Scripts:
    """Check the layout, write <run>/slurm/pretrain.sbatch (or `out`) and, when the recipe has eval
    tasks, <run>/slurm/eval.sbatch beside it."""
    check_layout(recipe_path, job)
    recipe = load_recipe(recipe_path)
    workdir = Path.cwd()
    run_dir = recipe.run_path() if recipe.run_path().is_absolute() else workdir / recipe.run_path()
    log_dir = run_dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    script = out or log_dir / "pretrain.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render_sbatch(recipe_path, recipe.name, log_dir, workdir, job))
    script.chmod(0o755)
    eval_script = None
    if recipe.eval.tasks:
        eval_script = script.with_name("eval.sbatch")
        eval_script.write_text(render_eval_sbatch(run_dir, recipe.name, log_dir, workdir, job))
        eval_script.chmod(0o755)
    return Scripts(script, eval_script)


def submit(script: Path, after: str | None = None) -> str:
    """sbatch the script (to start once job `after` has started, if given); returns Slurm's job id."""
    if shutil.which("sbatch") is None:
        raise UserError(f"sbatch not found on PATH: run this on a Slurm login node, or submit {script} there yourself")
    dependency = [f"--dependency=after:{after}"] if after else []
    done = subprocess.run(["sbatch", "--parsable", *dependency, str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch {script} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]
