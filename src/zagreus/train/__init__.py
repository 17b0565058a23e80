"""Training: the pretraining loop, checkpoints, optimizer, losses, metrics, parallelism."""
