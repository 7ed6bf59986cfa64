"""What a run needs around the task: the CLI, run directories, loggers, one-line errors, SLURM, atomic
checkpoints and the checkpoint on interruption."""
