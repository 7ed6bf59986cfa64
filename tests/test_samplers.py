"""The training samplers yield their (epoch, index) pairs lazily and exactly as their list definitions:
DistributedSampler's shuffle split across ranks, torchvision's RASampler order, whole aspect-ratio
batches dealt to ranks; a resumed epoch skips exactly what was trained on."""

from __future__ import annotations

import types
from unittest import mock

import pytest
import torch

from datamodules import samplers
from datamodules.samplers import AspectRatioGroupedSampler, RepeatedAugmentationSampler, ResumableSampler


def _on_rank(world: int, rank: int):
    return mock.patch.multiple(samplers, world_size=lambda: world, rank=lambda: rank)


@pytest.mark.parametrize(("world", "rank", "start"), [(1, 0, 0), (2, 1, 0), (3, 2, 4)])
def test_resumable_sampler_is_distributed_samplers_order(world, rank, start):
    data = list(range(23))
    with _on_rank(world, rank):
        sampler = ResumableSampler(data, seed=5)
    sampler.set_epoch(3)
    sampler.start = start
    pairs = iter(sampler)
    assert isinstance(pairs, types.GeneratorType)  # nothing listed up front
    g = torch.Generator().manual_seed(5 + 3)
    order = torch.randperm(23, generator=g).tolist()
    total = sampler.total_size
    order = (order + order[: total - len(order)])[rank:total:world]  # DistributedSampler's padding and split
    assert list(pairs) == [(3, i) for i in order[start:]]
    assert list(sampler) == [(3, i) for i in order]  # the skip applies once


@pytest.mark.parametrize(("world", "rank", "start"), [(1, 0, 0), (2, 0, 3), (2, 1, 5)])
def test_repeated_augmentation_order_is_torchvisions(world, rank, start):
    data, repeats = list(range(13)), 3
    with _on_rank(world, rank):
        sampler = RepeatedAugmentationSampler(data, repeats=repeats, seed=1)
    sampler.set_epoch(2)
    sampler.start = start
    g = torch.Generator().manual_seed(1 + 2)
    order = torch.randperm(13, generator=g).tolist()
    repeated = [(i, r) for i in order for r in range(repeats)][: sampler.total_size]
    mine = repeated[rank::world]
    assert list(sampler) == [(2, i, r) for i, r in mine[start:]]
    assert len(list(sampler)) == len(sampler) == 13 // world


@pytest.mark.parametrize(("world", "rank", "start"), [(1, 0, 0), (2, 1, 2)])
def test_aspect_ratio_sampler_deals_whole_batches(world, rank, start):
    groups = [k % 3 for k in range(30)]
    with _on_rank(world, rank):
        sampler = AspectRatioGroupedSampler(list(range(30)), groups, batch_size=4, seed=0)
    sampler.set_epoch(1)
    batches = sampler._batches()[: sampler.batches_per_rank * world][rank::world]
    sampler.start = start
    got = list(sampler)
    assert got == [(1, i) for b in batches for i in b][start:]
    whole = [i for _, i in list(sampler)]
    for k in range(0, len(whole), 4):
        assert len({groups[i] for i in whole[k : k + 4]}) == 1  # one aspect-ratio group per batch
