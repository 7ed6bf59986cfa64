"""What a command line and a checkpoint say about a run, read before it is built: the datamodule class a command
line names (for ``--help``), and the arguments a resumed or evaluated checkpoint records against the ones given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

import datamodules


def named_data_class(argv: list[str]) -> type | None:
    """The datamodule class a command line names: ``--data <class>``, or the ``data.class_path`` of a ``--config``
    file (the last one given wins, as when parsing); ``None`` when none, or not one of the project's."""
    named = None
    for flag, value in zip(argv, argv[1:]):
        if flag == "--data" and not value.startswith(("{", "-")):
            named = value
        elif flag in ("--config", "-c") and Path(value).is_file():
            section = (yaml.safe_load(Path(value).read_text()) or {}).get("data")
            if isinstance(section, dict) and section.get("class_path"):
                named = section["class_path"]
    if named is None:
        return None
    try:
        return datamodules.resolve(named if "." in named else f"datamodules.{named}")
    except ValueError:
        return None


#: model arguments a checkpoint's own values override without a word (nothing to compare: the weights come from
#: the file, and the label set's size is found at the first setup)
_NOT_COMPARED = ("weights", "weights_backbone", "num_classes", "backbone_args")


def checkpoint_conflicts(cfg: Namespace, hparams: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """The arguments a command line gives other values than the checkpoint records, as ``model.<key>=<given>
    (checkpoint: <recorded>)``: the model's, and the data's ``batch_size`` (the loader's position and the
    default recipe's learning rate are counted in its batches)."""
    found = []
    model = cfg.get("model") or Namespace()
    for key, recorded in hparams.items():
        if key in _NOT_COMPARED or key not in model:
            continue
        given = model[key]
        given = given.as_dict() if isinstance(given, Namespace) else given
        if given is not None and given != recorded:
            found.append(f"model.{key}={given!r} (checkpoint: {recorded!r})")
    data_cfg = cfg.get("data")
    given = data_cfg.get("init_args", data_cfg).get("batch_size") if isinstance(data_cfg, Namespace) else None
    if "batch_size" in data and given is not None and given != data["batch_size"]:
        found.append(f"data.batch_size={given!r} (checkpoint: {data['batch_size']!r})")
    return found
