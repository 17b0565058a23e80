"""`zagreus slurm`: write (and optionally submit) the sbatch script of a multi-node pretraining run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("slurm")
    def slurm(recipe: Path = typer.Argument(..., help="YAML recipe"),
              nodes: int = typer.Option(..., min=1, help="number of nodes"),
              gpus_per_node: int = typer.Option(..., min=1, help="GPUs (processes) per node"),
              partition: Optional[str] = typer.Option(None, help="Slurm partition"),
              time: str = typer.Option("24:00:00", help="time limit per job (it requeues itself before the limit)"),
              account: Optional[str] = typer.Option(None, help="Slurm account"),
              cpus_per_node: Optional[int] = typer.Option(None, help="CPUs for the one task per node"),
              setup: Optional[str] = typer.Option(None, help="shell line run first on each job start; default: "
                                                             "activate this command's virtual environment"),
              out: Optional[Path] = typer.Option(None, help="script path; default <run>/slurm/pretrain.sbatch"),
              submit: bool = typer.Option(False, "--submit", help="submit it with sbatch")) -> None:
        """Write an sbatch script running `zagreus pretrain RECIPE` with torchrun on every node (requeue + resume)."""
        from zagreus.launch.slurm import SlurmJob, default_setup, submit as sbatch, write_sbatch

        job = SlurmJob(nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time, account=account,
                       cpus_per_node=cpus_per_node, setup=setup if setup is not None else default_setup())
        script = write_sbatch(recipe, job, out)
        typer.echo(f"wrote {script} ({nodes} x {gpus_per_node} GPUs)")
        if submit:
            typer.echo(f"submitted job {sbatch(script)}")
        else:
            typer.echo(f"submit with: sbatch {script}")
