"""A trained task from its checkpoint and the predictor over it: they know the task contract and the registry,
never a task by name."""
