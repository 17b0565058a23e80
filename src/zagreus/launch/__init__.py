"""Launchers: sbatch scripts for multi-node torchrun under Slurm."""
