"""Aspect-ratio grouped sampling for detection, correct with or without DDP.

Batches made of images of similar aspect ratio pad less after the detector's resize (torchvision's
reference scripts group into ``2k + 1`` log-spaced bins, ``k = 3``). The sampler subclasses
``DistributedSampler``, so Lightning uses it as it is instead of wrapping it (which would interleave
indices across ranks and break the grouping): it shuffles per epoch (``set_epoch``), builds
group-homogeneous batches, and deals whole batches to the ranks.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import chain, islice

import torch
from torch.utils.data import DistributedSampler

from zoo_common.distributed import rank, world_size


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]], k: int = 3) -> list[int]:
    """Group index per image from its ``(width, height)``: bins ``2 ** linspace(-1, 1, 2k + 1)`` of w / h."""
    bins = [2 ** (-1 + 2 * i / (2 * k)) for i in range(2 * k + 1)]
    return [bisect.bisect_right(bins, w / h) for w, h in sizes]


class AspectRatioGroupedSampler(DistributedSampler):
    """Shuffled indices whose consecutive ``batch_size`` runs share an aspect-ratio group.

    Yields ``(epoch, index)`` pairs for an ``EpochSeeded`` dataset and, like ``ResumableSampler``, can
    start in the middle of an epoch (``start``).

    Args:
        dataset: the dataset (only its length is used).
        group_ids: group of each sample (:func:`aspect_ratio_groups`).
        batch_size: images per batch and rank; the loader must use the same ``batch_size`` and
            ``drop_last=True``.
        seed: base of the per-epoch shuffling seed.
    """

    def __init__(self, dataset, group_ids: Sequence[int], batch_size: int, seed: int = 0) -> None:
        world = world_size()
        super().__init__(dataset, num_replicas=world, rank=rank(), shuffle=True, seed=seed, drop_last=True)
        if len(group_ids) != len(dataset):
            raise ValueError(f"{len(group_ids)} group ids for {len(dataset)} samples")
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        full_batches = sum(count // batch_size for count in Counter(self.group_ids).values())
        self.batches_per_rank = full_batches // world
        self.num_samples = self.batches_per_rank * batch_size
        self.total_size = self.num_samples * world
        self.start = 0

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.group_ids), generator=generator).tolist()
        buckets: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for index in order:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket)
                buckets[self.group_ids[index]] = []
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        batches = self._batches()[: self.batches_per_rank * self.num_replicas]
        mine = batches[self.rank :: self.num_replicas]
        start, self.start = self.start, 0  # resuming mid-epoch: skip what was trained on (see ResumableSampler)
        epoch = self.epoch
        return ((epoch, index) for index in islice(chain.from_iterable(mine), start, None))

    def __len__(self) -> int:
        return self.num_samples


class ResumableSampler(DistributedSampler):
    """Training order that depends only on ``(seed, epoch)`` and can restart in the middle of an epoch.

    Yields ``(epoch, index)`` pairs, shuffled by a generator seeded with ``seed + epoch`` (never the
    global RNG), split across DDP ranks like ``DistributedSampler`` (whose subclass it is, so Lightning
    calls ``set_epoch`` and does not replace it). ``start`` skips the samples this rank already trained
    on in the current epoch, once: a resumed run continues where the interrupted one stopped.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(
            dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0
        epoch = self.epoch  # the pairs are made as the loader asks for them, not listed up front
        return ((epoch, i) for i in islice(super().__iter__(), start, None))


class RepeatedAugmentationSampler(ResumableSampler):
    """Repeated augmentation (Hoffer et al. 2020; Berman et al. 2019): each drawn image appears
    ``repeats`` times in an epoch, each time with its own random augmentation, its copies spread over the
    DDP ranks -- torchvision's ``RASampler`` (``references/classification/sampler.py``), used with 4
    repeats by its 80.9 % ResNet-50 recipe.

    As torchvision's, an epoch keeps its length: the shuffled indices are repeated ``repeats`` times in
    place, dealt round-robin to the ranks, and each rank takes ``len(dataset) // world`` of them, so an
    epoch sees the first ``len(dataset) / repeats`` images of its shuffle ``repeats`` times each (torchvision
    also rounds the epoch down to a multiple of 256 images, which would leave a small dataset empty; not
    here). Yields ``(epoch, index, repeat)``: ``EpochSeeded`` seeds each repeat's draws differently.
    """

    def __init__(self, dataset, repeats: int, seed: int = 0) -> None:
        super().__init__(dataset, shuffle=True, seed=seed, drop_last=True)
        if repeats < 1:
            raise ValueError(f"repeated augmentation needs 1 or more repeats, not {repeats}")
        self.repeats = repeats
        self.num_samples = len(dataset) // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        start, self.start = self.start, 0  # resuming mid-epoch (see ResumableSampler)
        epoch, repeats = self.epoch, self.repeats
        # position p of the repeated order is copy p % repeats of order[p // repeats]; this rank takes
        # every num_replicas-th position, from its own, and skips the ``start`` it already trained on
        positions = range(self.rank + start * self.num_replicas, self.total_size, self.num_replicas)
        return ((epoch, order[p // repeats], p % repeats) for p in positions)
