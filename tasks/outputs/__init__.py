"""What a run writes for people to read: prediction files, drawings (with their palette) and W&B media."""
