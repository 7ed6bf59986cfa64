"""DataLoader plumbing shared by every datamodule: exact distributed evaluation, corrupt-sample skipping."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

log = logging.getLogger(__name__)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def eval_sampler(dataset: Dataset) -> UnrepeatedDistributedSampler | None:
    """Under DDP, split an evaluation set across ranks *without* padding.

    Lightning's default ``DistributedSampler`` repeats samples so that every rank gets the same number,
    which would count those samples twice in accuracy, mAP or IoU. Lightning keeps a sampler that is
    already distributed, so evaluation loaders pass this one.
    """
    if not distributed():
        return None
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


def check_enough_for_a_batch(dataset: Dataset, batch_size: int) -> None:
    """Training drops incomplete batches: a training set smaller than one batch would train on nothing."""
    if len(dataset) < batch_size:
        raise ValueError(
            f"the training set has {len(dataset)} samples, fewer than data.batch_size={batch_size}: no full "
            f"batch to train on. Lower data.batch_size or add data."
        )


def collate_skipping(batch: Sequence) -> dict:
    """``default_collate`` that drops samples the dataset marked unreadable (``None``) and counts them."""
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return {"skipped": skipped}
    out = default_collate(kept)
    out["skipped"] = skipped
    return out


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    train: bool,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    collate_fn: Callable = collate_skipping,
) -> DataLoader:
    """A DataLoader with the project's defaults: shuffling and ``drop_last`` for training only."""
    if train:
        check_enough_for_a_batch(dataset, batch_size)
    sampler = None if train else eval_sampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        drop_last=train,
        collate_fn=collate_fn,
    )
