"""Lightning tasks over the backbone zoo; each runnable as ``python -m tasks.<name> fit|validate|test|predict``.

The commands sit here (``classify``, ``detect``, ``segment``, ``localize``, ``export``, ``demo``) beside the
registry of the tasks (``tasks.registry``); everything else lives in a wing whose folder says what it is:
``core`` (the base task and its contract, recipes, schedules, EMA, the val/test loop), ``heads`` (plain
``nn.Module`` heads), ``metrics`` (COCO, the devkits, localization and confusion scores), ``outputs``
(writers, drawings, W&B media), ``inference`` (a trained task from its checkpoint, the predictor) and
``run`` (the CLI, run directories, loggers, one-line errors, SLURM, atomic checkpoints).

``from tasks import load_predictor`` gives predictions in Python from a checkpoint (``tasks.inference``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings


class _MovedModule(importlib.abc.Loader):
    """A module by its old name (``tasks.ema``): the names of the module it moved to, with a warning."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module) -> None:
        warnings.warn(f"{module.__name__} moved to {self.target}", DeprecationWarning, stacklevel=2)
        target = importlib.import_module(self.target)
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})


class _MovedModules(importlib.abc.MetaPathFinder):
    """Finds the modules ``tasks.registry.MOVED_MODULES`` names by their old names."""

    def find_spec(self, fullname: str, path=None, target=None):
        if not fullname.startswith("tasks."):
            return None
        from .registry import MOVED_MODULES

        moved = MOVED_MODULES.get(fullname)
        return importlib.util.spec_from_loader(fullname, _MovedModule(moved)) if moved else None


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name == "load_predictor":  # imported on first use: ``import tasks.classify`` stays as light as before
        from .inference.predictor import load_predictor

        return load_predictor
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
