"""What the tasks and ``python -m datamodules.check`` may rely on a datamodule for, as ``typing.Protocol``s.

Every datamodule here satisfies the ones of its kind; a datamodule of your own satisfies them by having
the members, nothing to inherit. The tasks ask ``isinstance(datamodule, LabelledData)`` and so on, never
``getattr`` with a default.

* :class:`LabelledData` -- the label set: ``num_classes`` and ``class_names`` (known after ``setup``);
* :class:`IdLabelledData` -- a label set of dataset category ids (COCO-style): ``category_ids`` too;
* :class:`BatchedData` -- ``batch_size`` per process (the default recipes' linear scaling, the EMA's decay);
* :class:`SizedImages` -- ``image_size``, the side of the images a classifier sees (its default recipe);
* :class:`DetectionData` -- how a detection split is scored: ``protocol`` (``tasks.metrics.protocols``),
  ``annotation_file(split)`` (COCO), ``ground_truth(split)`` and ``evaluation_blacklist(split)`` (devkits);
* :class:`CheckableData` -- ``check(decode, fix)``: the reports ``python -m datamodules.check`` prints;
* :class:`PredictableData` -- ``predict_on(images)``: a ``predict`` loader over given images (the predictor).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class LabelledData(Protocol):
    num_classes: int
    class_names: list[str]


@runtime_checkable
class IdLabelledData(LabelledData, Protocol):
    category_ids: list[int]


@runtime_checkable
class BatchedData(Protocol):
    batch_size: int


@runtime_checkable
class SizedImages(Protocol):
    """Images cropped or resized to ``image_size`` pixels (classification: the recipe follows it)."""

    image_size: int


@runtime_checkable
class DetectionData(IdLabelledData, Protocol):
    protocol: str

    def annotation_file(self, split: str) -> Path: ...

    def ground_truth(self, split: str) -> dict[int, tuple[Any, Any, Any]]: ...

    def evaluation_blacklist(self, split: str) -> set[tuple[int, int]] | None: ...


@runtime_checkable
class CheckableData(Protocol):
    def check(self, decode: bool = True, fix: bool = False) -> Iterable[Any]: ...


@runtime_checkable
class PredictableData(Protocol):
    def predict_on(self, images: Sequence) -> Any: ...
