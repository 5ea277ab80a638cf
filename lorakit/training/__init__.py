"""Training: the configuration, data, loss, the loop and its checkpoints, distributed runs, the memory estimate."""
