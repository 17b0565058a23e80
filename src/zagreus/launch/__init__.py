"""Launchers: `zagreus run` chaining a recipe's stages (pipeline), and sbatch scripts for
multi-node torchrun under Slurm (slurm)."""
