"""The task checkpoint format, in one room: what this project's tasks write into a Lightning checkpoint
beside Lightning's own keys, and how a checkpoint is read back -- always with ``weights_only=True``.

Lightning writes ``state_dict``, ``hyper_parameters`` (the task's constructor arguments),
``datamodule_hyper_parameters`` (with the datamodule's ``_class_path``), the loops' and callbacks' states
and, under the datamodule's class name, its own state. A task adds (:func:`write_task_record`):

* ``task`` -- the task that wrote it, as its registry path (``tasks.detect.DetectionTask``), never
  ``__main__``: ``tasks.registry`` maps it back to a class without importing anything it names;
* ``class_names`` and ``category_ids`` -- the label set (ids for COCO-style label spaces);
* ``backbone`` -- the zoo backbone: ``name``, builder ``options``, ``architecture`` (the options a weight
  file must agree with) and ``keys`` (a prefix of the backbone's names to a prefix of the checkpoint's,
  including stages a C4 detector's box head holds);
* ``rng_state`` -- Python's, NumPy's and torch's random states (tensors and plain numbers), so that a
  resumed run draws what an uninterrupted one would;
* ``weights: "ema"`` when ``state_dict`` holds an exponential moving average of the weights (the trained
  ones are then under ``current_model_state``, Lightning's ``WeightAveraging`` key).

The tasks, the checkpoint loader (``tasks.inference``), the CLI's safety check and ``backbones.export``
read checkpoints through :func:`read_task_checkpoint`; the networks package reads plain state dicts and
architecture records only (:func:`backbone_state`).
"""

from __future__ import annotations

import argparse
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASK = "task"
CLASS_NAMES = "class_names"
CATEGORY_IDS = "category_ids"
BACKBONE = "backbone"
RNG_STATE = "rng_state"
WEIGHTS = "weights"
CURRENT_MODEL_STATE = "current_model_state"
#: the marker of a ``state_dict`` that holds the EMA of the weights
EMA = "ema"


class WeightsError(ValueError):
    """A weights source or checkpoint that cannot be read, is unsafe, or does not fit the network."""


def torch_load_safe(source: str | Path | object, what: str, mmap: bool = False) -> object:
    """``torch.load`` restricted to tensors and plain containers (plus ``argparse.Namespace``): a file
    holding other Python objects is refused with :class:`WeightsError` naming ``what``, never executed.
    ``mmap``: map the tensors instead of reading them (to look at a checkpoint's counters cheaply)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"{what}: refused to load. The file holds Python objects other than tensors and plain "
            f"containers, and weights are only read with torch.load(weights_only=True) so that a file "
            f"cannot run code ({first}). If you trust it, re-save just its state_dict (or as .safetensors)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"{what}: not a readable PyTorch file ({type(err).__name__}: {err})") from None


# -- random states ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and CUDA) random states, as tensors and plain numbers."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` recorded."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"], numpy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing ---------------------------------------------------------------------------------------
def write_task_record(
    checkpoint: dict,
    *,
    task: str,
    class_names: list[str] | None,
    category_ids: list[int] | None,
    backbone: dict,
) -> None:
    """Add what a task records to a checkpoint Lightning is about to write (see the module docstring)."""
    checkpoint[RNG_STATE] = rng_state()
    checkpoint[CLASS_NAMES] = [str(n) for n in (class_names or [])]
    checkpoint[CATEGORY_IDS] = [int(i) for i in (category_ids or [])]
    checkpoint[BACKBONE] = backbone
    checkpoint[TASK] = task


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class TaskCheckpoint:
    """A checkpoint of this project's tasks, as read by :func:`read_task_checkpoint`.

    Attributes:
        path: the file.
        task: the recorded task (a registry path such as ``tasks.detect.DetectionTask``; ``None`` in files
            written before it was recorded).
        hyper_parameters: the task's constructor arguments (Lightning's private ``_`` keys left out).
        state_dict: every tensor of the task.
        class_names, category_ids: the label set.
        backbone: the backbone record (``name``, ``options``, ``architecture``, ``keys``), ``{}`` if none.
        datamodule: the datamodule's recorded arguments, ``_class_path`` first (``{}`` if none).
        datamodule_state: the datamodule's saved state (its per-pixel mean, say).
        averaged: whether ``state_dict`` holds an EMA of the weights.
        raw: the whole loaded dictionary.
    """

    path: Path
    task: str | None
    hyper_parameters: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    backbone: dict[str, Any] = field(default_factory=dict)
    datamodule: dict[str, Any] = field(default_factory=dict)
    datamodule_state: dict[str, Any] = field(default_factory=dict)
    averaged: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def network_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix`` (a task's network attribute and a dot), without it."""
        return {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}


def is_task_checkpoint(raw: object) -> bool:
    """Whether a loaded file looks like a Lightning checkpoint of a task (a state dict and hyperparameters)."""
    return isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict) and "hyper_parameters" in raw


def task_checkpoint(raw: dict, path: Path) -> TaskCheckpoint:
    """The :class:`TaskCheckpoint` view of an already loaded checkpoint."""
    hparams = raw.get("hyper_parameters") or {}
    data = dict(raw.get("datamodule_hyper_parameters") or {})
    # Lightning keeps a datamodule's state under its class name
    data_state = raw.get(str(data.get("_class_path", "")).rsplit(".", 1)[-1]) or {}
    recorded = raw.get(BACKBONE)
    return TaskCheckpoint(
        path=path,
        task=raw.get(TASK) or None,
        hyper_parameters={k: v for k, v in dict(hparams).items() if not str(k).startswith("_")},
        state_dict=raw["state_dict"],
        class_names=[str(n) for n in raw.get(CLASS_NAMES) or []],
        category_ids=[int(i) for i in raw.get(CATEGORY_IDS) or []],
        backbone=dict(recorded) if isinstance(recorded, dict) else {},
        datamodule=data,
        datamodule_state=data_state if isinstance(data_state, dict) else {},
        averaged=raw.get(WEIGHTS) == EMA,
        raw=raw,
    )


def read_task_checkpoint(path: str | Path, mmap: bool = False) -> TaskCheckpoint:
    """Read a task checkpoint (``weights_only``); a file that is not one is a :class:`WeightsError`
    saying what it is instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raw = torch_load_safe(path, f"checkpoint {path}", mmap=mmap)
    if not is_task_checkpoint(raw):
        raise WeightsError(f"{path}: {describe(raw)}, not a checkpoint of this project's tasks")
    return task_checkpoint(raw, path)


def describe(raw: object) -> str:
    """What a loaded file is, for messages: a plain state dict, a training checkpoint, something else."""
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return (
            f"a plain state dict ({len(raw)} tensors, no hyperparameters): give it as --model.weights or "
            f"--model.weights_backbone"
        )
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        return "a training checkpoint with a 'model' state dict (torchvision's references write these)"
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        return "a checkpoint without hyperparameters (not written by this project's tasks)"
    return f"a file holding a {type(raw).__name__}"


def backbone_state(state: dict[str, torch.Tensor], keys: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The backbone's tensors in a task checkpoint's state dict, under the backbone's own names.

    ``keys`` maps a prefix of the backbone's names to where the checkpoint keeps it (the ``backbone``
    record's ``keys``, e.g. ``{"": "net.body.", "layer4.": "net.head.res5.0."}`` for a detector whose box
    head holds the last stage, as the C4 design does). Without it, the checkpoint's names are read below
    the shortest prefix that holds a ``layer1.0.conv1.weight`` (a bare state dict's is empty).
    """
    if keys:
        out: dict[str, torch.Tensor] = {}
        taken: set[str] = set()
        for ours, theirs in sorted(keys.items(), key=lambda kv: -len(kv[1])):  # most specific first
            for key, value in state.items():
                if key.startswith(theirs) and key not in taken:
                    taken.add(key)
                    out[ours + key[len(theirs) :]] = value
        return out
    marker = "layer1.0.conv1.weight"  # the first unit's first convolution: every zoo network has one
    prefixes = [k[: -len(marker)] for k in state if k.endswith(marker)]
    if not prefixes:
        return state
    prefix = min(prefixes, key=len)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# -- what a checkpoint may not make us build ------------------------------------------------------------
def class_specs(value: Any, where: str = "") -> list[tuple[str, str]]:
    """Every ``{"class_path": ...}`` spec inside ``value`` (nested dicts and lists), as ``(field, class path)``.

    A task's hyperparameters never hold one (the optimizer and schedule, the only classes a config builds
    for a task, are not saved); jsonargparse would build whatever such a spec names when Lightning passes a
    checkpoint's hyperparameters through it (``--ckpt_path``, ``load_from_checkpoint``).
    """
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        if "class_path" in value:
            found.append((where or "(top level)", str(value["class_path"])))
        for key, item in value.items():
            found.extend(class_specs(item, f"{where}.{key}" if where else str(key)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.extend(class_specs(item, f"{where}[{index}]"))
    return found


def refuse_class_specs(hyper_parameters: dict, path: str | Path) -> None:
    """Stop with one line naming the field when a checkpoint's hyperparameters hold a class spec."""
    specs = class_specs({k: v for k, v in hyper_parameters.items() if k != "_instantiator"})
    if specs:
        field_name, class_path = specs[0]
        raise WeightsError(
            f"{path}: hyper_parameters.{field_name} asks to build {class_path}; a checkpoint's arguments are never "
            f"instantiated as classes (this file was not written by this project's tasks, or was edited). "
            f"Remove that field, or pass the arguments on the command line instead."
        )
