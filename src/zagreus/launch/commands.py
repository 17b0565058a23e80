"""`zagreus check`, `zagreus run` (the stages of a recipe chained) and `zagreus slurm` (the sbatch
scripts of a recipe: multi-node pretraining, its evaluation job, post-training)."""

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
    """Run every stage of a recipe: data, pretrain, eval, sft, dpo, final-eval, release."""
    from zagreus.launch.pipeline import run_pipeline
    from zagreus.recipe import load_recipe

    run_pipeline(load_recipe(recipe), recipe, from_stage, until)


def slurm(recipe: Path = typer.Argument(..., help="YAML recipe"),
          nodes: int = typer.Option(..., min=1, help="number of nodes"),
          gpus_per_node: int = typer.Option(..., min=0, help="GPUs per node; 0 writes CPU jobs (gloo, --device cpu)"),
          nproc_per_node: Optional[int] = typer.Option(None, min=1, help="torchrun processes per node; default the GPU "
                                                                         "count (required with --gpus-per-node 0)"),
          stage: Optional[list[str]] = typer.Option(None, "--stage", help="pretrain, sft or dpo (repeatable); default "
                                                                          "pretrain plus the recipe's sft/dpo sections"),
          partition: Optional[str] = typer.Option(None, help="Slurm partition"),
          time: str = typer.Option("24:00:00", help="time limit per job (it requeues itself before the limit)"),
          account: Optional[str] = typer.Option(None, help="Slurm account"),
          cpus_per_node: Optional[int] = typer.Option(None, help="CPUs for the one task per node; default on a CPU "
                                                                 "job: one per process"),
          setup: Optional[str] = typer.Option(None, help="shell line run first on each job start; default: "
                                                         "activate this command's virtual environment"),
          out: Optional[Path] = typer.Option(None, help="script path; default <run>/slurm/pretrain.sbatch (the "
                                                        "other jobs' scripts go beside it)"),
          submit: bool = typer.Option(False, "--submit", help="submit them with sbatch, chained; prints the job ids")) -> None:
    """Write sbatch scripts: `zagreus pretrain RECIPE` with torchrun on every node (requeue + resume); when the
    recipe has eval tasks, a one-device job scoring each checkpoint as it lands (`eval --watch`, after:pretrain);
    and one-process sft/dpo jobs for those sections (afterok the previous stage)."""
    from zagreus.launch.slurm import SlurmJob, default_setup, submit_all, write_sbatch

    job = SlurmJob(nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, time=time, account=account,
                   cpus_per_node=cpus_per_node, setup=setup if setup is not None else default_setup(),
                   nproc_per_node=nproc_per_node)
    scripts = write_sbatch(recipe, job, out, stages=stage)
    one = "1 CPU" if job.cpu else "1 GPU"
    if scripts.pretrain:
        what = f"{job.procs} CPU processes" if job.cpu else f"{gpus_per_node} GPUs"
        typer.echo(f"wrote {scripts.pretrain} ({nodes} x {what})")
    if scripts.eval:
        typer.echo(f"wrote {scripts.eval} ({one}: eval --watch beside the training job)")
    for name in ("sft", "dpo"):
        if getattr(scripts, name):
            typer.echo(f"wrote {getattr(scripts, name)} ({one}: zagreus {name}, one process)")
    if not submit:
        previous = None
        if scripts.pretrain:
            typer.echo(f"submit with: sbatch {scripts.pretrain}")
            previous = "TRAINING_JOB_ID"
        if scripts.eval:
            typer.echo(f"        then: sbatch --dependency=after:TRAINING_JOB_ID {scripts.eval}")
        for name in ("sft", "dpo"):
            script = getattr(scripts, name)
            if script:
                dependency = f"--dependency=afterok:{previous} " if previous else ""
                typer.echo(f"        then: sbatch {dependency}{script}")
                previous = f"{name.upper()}_JOB_ID"
        return
    for name, job_id, dependency in submit_all(scripts):
        if name == "pretrain":
            typer.echo(f"submitted job {job_id}")
        else:
            typer.echo(f"submitted job {job_id} ({name}" + (f", {dependency.replace(':', ' ')})" if dependency else ")"))


def register(app: typer.Typer) -> None:
    app.command("check")(check)
    app.command("run")(run)
    app.command("slurm")(slurm)
