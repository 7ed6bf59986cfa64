"""Reading W&B offline runs back: the metrics a run logged, without a W&B account or network.

An offline run (``<run dir>/wandb/offline-run-*/run-<id>.wandb``) is a record log in LevelDB's log
format (32 KiB blocks of checksummed, possibly fragmented records) behind a 7-byte ``:W&B`` header;
each record is a ``wandb.proto.wandb_internal_pb2.Record``. ``wandb sync`` uploads the same file. The
tests read what runs logged to W&B through :func:`read_offline_run`; the studies report reads the
``metrics.csv`` every run writes beside it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

_BLOCK = 32768
_HEADER = 7  # checksum (4), length (2), type (1); also the file header's size (":W&B", magic, version)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (no ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run: str | Path) -> dict:
    """``{"id", "history": [{metric: value, ...} per logged step], "config", "summary", "tags", "group",
    "exited", "dir"}``; ``dir`` is the offline run's folder (its media under ``files/``); ``exited`` says the
    file holds the run's closing ``exit`` record (``run.finish()`` was written out: nothing more will come).

    ``run`` is an ``offline-run-*`` folder, its ``.wandb`` file, or a task's run directory (the newest
    offline run below it is read).
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(run)
    if path.is_dir():
        files = sorted(path.rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise FileNotFoundError(f"{path}: no W&B run file (run-*.wandb) below it")
        path = files[-1]
    out: dict = {
        "id": path.stem.removeprefix("run-"),
        "history": [],
        "config": {},
        "summary": {},
        "tags": [],
        "group": "",
        "exited": False,
        "dir": path.parent,
    }
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "run":
            out["tags"] = list(record.run.tags)
            out["group"] = record.run.run_group
        elif kind == "exit":
            out["exited"] = True
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
    return out


def metric_series(run: dict, name: str) -> list[float]:
    """Every logged value of ``name``, in logging order."""
    return [row[name] for row in run["history"] if name in row]


def media_rows(run: dict, key: str) -> list[dict]:
    """Each logged media value of ``key`` (``wandb.Image`` lists: ``_type``, ``count``, ``filenames``,
    ``captions``, ``all_boxes``, ``all_masks``, ...), with ``files``: its images' paths on disk and
    ``box_data``: each image's box sets read back (``{"predictions": [...], "ground_truth": [...]}``)."""
    prefix = key + "/"
    rows = []
    for row in run["history"]:
        if isinstance(row.get(key), dict) and "_type" in row[key]:
            value = dict(row[key])  # one JSON value (older wandb releases)
        elif prefix + "_type" in row:
            value = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}  # nested keys
        else:
            continue
        value["step"] = row.get("trainer/global_step")
        files = run["dir"] / "files"
        value["files"] = [files / name for name in value.get("filenames", [])]
        value["box_data"] = [
            {name: json.loads((files / meta["path"]).read_text())["box_data"] for name, meta in sets.items()}
            for sets in value.get("all_boxes", [])
        ]
        rows.append(value)
    return rows
