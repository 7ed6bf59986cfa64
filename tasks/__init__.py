"""Lightning tasks over the backbone zoo; each runnable as ``python -m tasks.<name> fit|validate|test|predict``.

``from tasks import load_predictor`` gives predictions in Python from a checkpoint (``tasks.predictor``).
"""


def __getattr__(name: str):
    if name == "load_predictor":  # imported on first use: ``import tasks.classify`` stays as light as before
        from .predictor import load_predictor

        return load_predictor
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
