"""The base task and its declared contract, the default recipes and the optimizer, schedules, the EMA of the
weights and the val/test loop. Imports no task module."""
