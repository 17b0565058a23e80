"""A real one-node Slurm for the tests: `slurm_cluster` starts munged, slurmctld and slurmd with
tests/slurm_cluster.sh in a temporary folder, points SLURM_CONF at it, and stops the daemons it
started afterwards. The tests skip when Slurm is not installed or we are not root.

Import the fixture into a test module: `from slurm_fixture import slurm_cluster  # noqa: F401`.
No slurmdbd: finished jobs are read with `sacct --completion` (jobcomp/filetxt) and stay in
`squeue -t all` / `scontrol show job` for MinJobAge (600 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmctld and slurmd run as root)"
    for exe in ("slurmctld", "slurmd", "munged"):
        if shutil.which(exe) is None and not Path("/usr/sbin", exe).is_file():
            return f"{exe} is not installed (apt-get install slurm-wlm munge)"
    for exe in ("sbatch", "squeue", "scontrol", "sacct", "sinfo"):
        if shutil.which(exe) is None:
            return f"{exe} is not on PATH"
    return None


@dataclass
class Cluster:
    dir: Path
    conf: Path

    def run(self, *args: str) -> str:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Dependency, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def array_tasks(self, job_id: str) -> dict[str, str]:
        """An array job's tasks: task index -> the task's own job id (what sacct lists)."""
        tasks = {}
        for line in self.run("scontrol", "show", "job", "-o", job_id).splitlines():
            fields = dict(item.partition("=")[::2] for item in line.split())
            tasks[fields["ArrayTaskId"]] = fields["JobId"]
        return tasks

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout} s (wanted {states})\n{self.logs()}")
            time.sleep(0.5)

    def wait_end(self, *job_ids: str, timeout: float = 180) -> dict[str, str]:
        """Wait for every job (array jobs: every task) to end; returns job id -> final state."""
        out = {}
        for job_id in job_ids:
            out[job_id] = self.wait_state(job_id, ENDED, timeout)
        return out

    def completed(self) -> list[dict[str, str]]:
        """Finished jobs as sacct sees them (from the jobcomp file): JobID, JobName, State."""
        out = self.run("sacct", "--completion", "-a", "-n", "-P", "-o", "jobid,jobname,state")
        return [dict(zip(("JobID", "JobName", "State"), line.split("|"))) for line in out.splitlines() if line]

    def logs(self) -> str:
        return "\n".join(f"--- {p}\n" + p.read_text()[-3000:] for p in sorted((self.dir / "log").glob("*.log")))


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    before = os.environ.get("SLURM_CONF")
    done = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=120)
    if done.returncode == 3:  # the script's own "cannot run here"
        pytest.skip(done.stderr.strip())
    try:
        assert done.returncode == 0, done.stderr
        os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
        yield Cluster(folder, folder / "slurm.conf")
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, text=True, timeout=120)
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
