"""`zagreus check`, `zagreus run` (the stages of a recipe chained) and `zagreus slurm` (the sbatch
script of a multi-node pretraining run)."""

from __future__ import annotations

# Only typer and the standard library at module level, so `zagreus --help` stays fast; each verb
# imports the code it runs.
from pathlib import Path
from typing import Optional

import typer


def check(recipe: Path = typer.Argument(..., help="YAML recipe"),
          gpus: Optional[int] = typer.Option(None, min=1, help="GPUs of the pretraining job; default: the layout's own "
                                                             "count, or one 8-GPU node when dp_shard is -1"),
          gpu: str = typer.Option("h100", help="GPU for the memory and time estimate: a100-40gb, a100-80gb, h100 or h200"),
          mfu: float = typer.Option(0.5, help="model FLOPs utilisation the step time assumes, a fraction in (0, 1]; "
                                              "0.5 is the project's target on H100")) -> None:
    """Validate a recipe and print the plan: stages, model size, token budget, and the per-GPU memory and
    step time of its pretraining layout."""
    from zagreus.launch.pipeline import plan
    from zagreus.recipe import load_recipe

    for line in plan(load_recipe(recipe), recipe, gpus=gpus, gpu=gpu, mfu=mfu):
        typer.echo(line)


def run(recipe: Path = typer.Argument(..., help="YAML recipe"),
        from_stage: Optional[str] = typer.Option(None, "--from", help="first stage to run"),
        until: Optional[str] = typer.Option(None, help="last stage to run")) -> None:
    """Run every stage of a recipe: data, pretrain, eval, sft, dpo, release."""
    from zagreus.launch.pipeline import run_pipeline
    from zagreus.recipe import load_recipe

    run_pipeline(load_recipe(recipe), recipe, from_stage, until)


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
    """Write an sbatch script running `zagreus pretrain RECIPE` with torchrun on every node (requeue + resume),
    and, when the recipe has eval tasks, a one-GPU job scoring each checkpoint as it lands (`eval --watch`)."""
    from zagreus.launch.slurm import SlurmJob, default_setup, submit as sbatch, write_sbatch

    job = SlurmJob(nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time, account=account,
                   cpus_per_node=cpus_per_node, setup=setup if setup is not None else default_setup())
    scripts = write_sbatch(recipe, job, out)
    typer.echo(f"wrote {scripts.pretrain} ({nodes} x {gpus_per_node} GPUs)")
    if scripts.eval:
        typer.echo(f"wrote {scripts.eval} (1 GPU: eval --watch beside the training job)")
    if not submit:
        typer.echo(f"submit with: sbatch {scripts.pretrain}")
        if scripts.eval:
            typer.echo(f"        then: sbatch --dependency=after:TRAINING_JOB_ID {scripts.eval}")
        return
    train_id = sbatch(scripts.pretrain)
    typer.echo(f"submitted job {train_id}")
    if scripts.eval:
        typer.echo(f"submitted job {sbatch(scripts.eval, after=train_id)} (eval, after {train_id})")


def register(app: typer.Typer) -> None:
    app.command("check")(check)
    app.command("run")(run)
    app.command("slurm")(slurm)
