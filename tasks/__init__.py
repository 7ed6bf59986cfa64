"""Lightning tasks over the backbone zoo; each runnable as ``python -m tasks.<name> fit|validate|test|predict``."""
