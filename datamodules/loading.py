"""DataLoader plumbing shared by every datamodule: exact distributed evaluation, resumable seeded training
order, corrupt-sample skipping, and the split/stage logic of the datamodules' hooks."""

from __future__ import annotations

import atexit
import gc
import logging
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors

from zoo_common.distributed import broadcast_object, distributed

from .folders import list_images
from .images import read_image
from .records import collection_paused
from .samplers import RepeatedAugmentationSampler, ResumableSampler

log = logging.getLogger(__name__)


def eval_sampler(dataset: Dataset) -> UnrepeatedDistributedSampler | None:
    """Under DDP, split an evaluation set across ranks *without* padding.

    Lightning's default ``DistributedSampler`` repeats samples so that every rank gets the same number,
    which would count those samples twice in accuracy, mAP or IoU. Lightning keeps a sampler that is
    already distributed, so evaluation loaders pass this one.
    """
    if not distributed():
        return None
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


def run_seed() -> int:
    """The seed of the training shuffle and of the per-sample draws: the process's torch seed, and under
    DDP rank 0's.

    Every rank must shuffle with the same seed, or the ranks' shares of an epoch overlap and miss
    samples. ``seed_everything: <int>`` gives every rank the same seed, and so does Lightning's own DDP
    launcher for ``seed_everything: true``; processes started by ``torchrun`` or ``srun`` each draw
    their own, so the seed is taken from rank 0.
    """
    return broadcast_object(torch.initial_seed() % 2**31)


def check_enough_for_a_batch(dataset: Dataset, batch_size: int) -> None:
    """Training drops incomplete batches: a training set smaller than one batch would train on nothing."""
    if len(dataset) < batch_size:
        raise ValueError(
            f"the training set has {len(dataset)} samples, fewer than data.batch_size={batch_size}: no full "
            f"batch to train on. Lower data.batch_size or add data."
        )


class EpochSeeded(Dataset):
    """A dataset whose sample ``(epoch, index)`` is always drawn with the same random numbers.

    Each access runs the wrapped dataset's transforms with torch's RNG seeded from ``(seed, epoch,
    index)`` (in a forked RNG state, so nothing else is disturbed): augmentations no longer depend on
    which worker loads a sample or on what it loaded before, so a run resumed in the middle of an
    epoch sees exactly the crops and flips the uninterrupted run saw.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        """``key``: an index, ``(epoch, index)``, or ``(epoch, index, repeat)`` from repeated augmentation
        (``samplers.RepeatedAugmentationSampler``), whose every repeat draws its own augmentation."""
        epoch, index, repeat = (tuple(key) + (0,))[:3] if isinstance(key, tuple) else (0, key, 0)
        with torch.random.fork_rng(devices=[]):
            # torch seeds are 64-bit: a run's seed can be any uint32 (LightningCLI draws one when unset)
            seed = ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63
            if repeat:  # torch's generator keeps the seed's low 32 bits: the repeat must change those
                seed = (seed * 6_364_136_223_846_793_005 + repeat * 1_442_695_040_888_963_407) % 2**63
            torch.manual_seed(seed)
            return self.dataset[index]


class _LeaveSignalsToTheRun:
    """A loader worker's ``worker_init_fn``: the worker ignores SIGTERM (and SLURM's SIGUSR1 warning), which a
    cluster sends to every process of a job. The training process handles them -- it saves its checkpoint at a
    step boundary and shuts its workers down in order; a worker dying of the signal first would make the
    training process raise "DataLoader worker is killed by signal" in the middle of its step instead."""

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


#: the worker-backed iterators this process started. Their workers ignore SIGTERM, so ``multiprocessing``'s
#: exit (``terminate``, then ``join``) would wait for ever on one still alive -- one whose iterator an
#: exception's traceback kept from being collected and shutting its workers down
_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # after torch's and multiprocessing's exit functions: atexit runs this one before them
def _stop_workers_left_running() -> None:
    for iterator in list(_ITERATORS):
        iterator._shutdown_workers()  # the iterator's own orderly shutdown: the workers are told, then joined
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()  # SIGKILL: the one signal a worker cannot ignore
                worker.join(timeout=5)


class SharedHeapLoader(DataLoader):
    """A DataLoader whose forked workers leave the training process's objects shared, and its signals to it.

    A worker forked from the training process shares its memory until it writes to a page. Reading the
    flat records writes nothing, but a full garbage collection in the worker writes to every tracked object
    it visits -- all of the parent's (PyTorch's, Lightning's, the model's): each worker would copy them
    over an epoch. The workers are started with those objects frozen (``gc.freeze``: never collected), as
    Python's documentation of ``gc.freeze`` advises before a fork; the training process unfreezes them once
    the workers are started, so nothing is kept from its own collections. The workers ignore SIGTERM and
    SIGUSR1 (``_LeaveSignalsToTheRun``): the training process handles them, and kills any still running
    when it exits (``_stop_workers_left_running``).
    """

    def __init__(self, *args, worker_init_fn: Callable[[int], None] | None = None, **kwargs) -> None:
        super().__init__(*args, worker_init_fn=_LeaveSignalsToTheRun(worker_init_fn), **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        gc.freeze()
        try:
            iterator = super().__iter__()
        finally:
            gc.unfreeze()
        if hasattr(iterator, "_workers"):
            _ITERATORS.add(iterator)
        return iterator


class ResumableDataLoader(SharedHeapLoader):
    """A training DataLoader whose position Lightning saves in checkpoints and restores on resume.

    ``state_dict`` records the epoch and how many samples were *trained on* in it (``trained_batches``,
    not what the loader prefetched); ``load_state_dict`` makes the sampler skip them.
    """

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict:
        completed = self._progress() if self._progress is not None else 0
        return {"epoch": int(self.sampler.epoch), "samples": int(completed * self.batch_size)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start = state["samples"]


def trained_batches(trainer) -> Callable[[], int]:
    """Batches the trainer has trained on in the current epoch (0 without a trainer).

    Lightning's *processed* count: a batch is processed once its optimizer step is done, and *completed*
    only after the ``on_train_batch_end`` hooks, so a checkpoint written in those hooks (SLURM's warning,
    ``ModelCheckpoint(every_n_train_steps)``) must count the batch it was written after.
    """

    def count() -> int:
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    return count


def collate_skipping(batch: Sequence) -> dict:
    """``default_collate`` that drops samples the dataset marked unreadable (``None``) and counts them.

    A field holding a list per sample (views of different sizes: multi-scale testing) stays a list of
    those lists.
    """
    kept = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return {"skipped": skipped}
    listed = [k for k, v in kept[0].items() if isinstance(v, list)] if isinstance(kept[0], dict) else []
    out = default_collate([{k: v for k, v in s.items() if k not in listed} for s in kept] if listed else kept)
    for key in listed:
        out[key] = [sample[key] for sample in kept]
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
    trainer=None,
    repeats: int = 1,
) -> DataLoader:
    """A DataLoader with the project's defaults.

    Training: a resumable, seed-determined shuffle (``ResumableSampler`` over ``EpochSeeded``) whose
    position goes into checkpoints, and ``drop_last``. Evaluation: in order, split across DDP ranks
    without repeats (``eval_sampler``). ``repeats`` > 1: repeated augmentation in training
    (``RepeatedAugmentationSampler``).
    """
    if train:
        check_enough_for_a_batch(dataset, batch_size)
        seed = run_seed()
        return ResumableDataLoader(
            EpochSeeded(dataset, seed),
            batch_size=batch_size,
            sampler=RepeatedAugmentationSampler(dataset, repeats, seed=seed)
            if repeats > 1
            else ResumableSampler(dataset, shuffle=True, seed=seed, drop_last=True),
            num_workers=num_workers,
            pin_memory=pin_memory and torch.cuda.is_available(),
            persistent_workers=persistent_workers and num_workers > 0,
            drop_last=True,
            collate_fn=collate_fn,
            progress=trained_batches(trainer),
        )
    sampler = eval_sampler(dataset)
    return SharedHeapLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        drop_last=train,
        collate_fn=collate_fn,
    )


#: The splits each ``Trainer`` entry point reads (``predict`` reads ``data.predict_root`` instead).
STAGE_SPLITS: dict[str, tuple[str, ...]] = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class SplitLoaders:
    """A datamodule's ``prepare_data``, ``setup`` and four loader hooks, over its ``_check_split``,
    ``_split``, ``_predict_dataset`` and ``_loader``.

    ``setup`` builds the splits a stage needs (``_split("train")`` ...); ``predict`` reads every image
    under ``hparams.predict_root``.
    """

    datasets: dict[str, Dataset]
    #: images per batch and process, for training and for evaluation (set by the datamodule)
    batch_size: int
    eval_batch_size: int
    #: the split ``setup`` builds first (the training split: ImageFolder's classes come from it)
    first_split: str = "train"

    def _check_split(self, split: str) -> None:
        """Raise, naming the path and the fix, when a file or folder ``split`` reads is missing (no parsing)."""

    def _split(self, split: str) -> Dataset:
        raise NotImplementedError

    def _predict_dataset(self, paths: list) -> Dataset:
        raise NotImplementedError

    def _loader(self, split: str, train: bool) -> DataLoader:
        raise NotImplementedError

    def split_loader(self, split: str, train: bool, collate_fn: Callable = collate_skipping, **options) -> DataLoader:
        """:func:`make_loader` over the split with the datamodule's loader options, written once: its
        ``batch_size`` (training) or ``eval_batch_size``, ``hparams.num_workers``, ``pin_memory``,
        ``persistent_workers``; ``options`` override them (``repeats``, ``pin_memory``, ...)."""
        hp = self.hparams
        batch_size = self.batch_size if train else self.eval_batch_size
        settings = {"batch_size": batch_size, "num_workers": hp.num_workers, "pin_memory": hp.pin_memory,
                    "persistent_workers": hp.persistent_workers, **options}  # fmt: skip
        return make_loader(self.datasets[split], train=train, collate_fn=collate_fn, trainer=self.trainer, **settings)

    def predict_on(self, images: Sequence) -> DataLoader:
        """A ``predict`` loader over ``images`` (paths, or :class:`datamodules.images.MemoryImage`), with the
        preprocessing ``predict`` applies to ``data.predict_root``'s files (``tasks.inference.predictor`` uses it)."""
        self.datasets["predict"] = self._predict_dataset(list(images))
        return self.predict_dataloader()

    def prepare_data(self) -> None:
        """Check that the files the running stage reads exist, before the trainer starts its loggers.

        Lightning calls ``prepare_data`` before it creates the W&B run, so a mistyped ``data.root`` stops
        with a message naming the missing path instead of leaving a crashed run behind.
        """
        trainer = getattr(self, "trainer", None)
        stage = trainer.state.fn.value if trainer is not None and trainer.state.fn is not None else None
        for split in STAGE_SPLITS.get(stage, ()):
            self._check_split(split)
        if stage == "predict" and "predict_root" in self.hparams:
            self._predict_paths()

    def _predict_paths(self) -> list:
        """The image files under ``data.predict_root`` (searched recursively), or an error saying what is wrong."""
        root = self.hparams.predict_root
        if not root:
            raise ValueError("predict needs data.predict_root: a folder of images")
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"data.predict_root={folder} is not a folder")
        paths = list_images(folder)
        if not paths:
            raise ValueError(f"data.predict_root={folder} holds no image files")
        return paths

    def setup(self, stage: str) -> None:
        for split in sorted(STAGE_SPLITS.get(stage, ()), key=lambda split: split != self.first_split):
            with collection_paused():  # a split's file is read into flat arrays and freed by reference counts
                self.datasets[split] = self._split(split)
        if stage == "predict":
            self.datasets["predict"] = self._predict_dataset(self._predict_paths())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", train=False)


class ImageListDataset(Dataset):
    """Unlabeled images for ``predict`` (detection and segmentation).

    ``image_id`` is the 1-based position in the sorted file list; ``original_size`` is the image's size
    before ``transform``, so predictions can be mapped back to it.
    """

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.paths[index])
        return {
            "image": self.transform(tv_tensors.Image(image)).as_subclass(torch.Tensor),
            "original_size": torch.tensor(image.shape[-2:]),
            "image_id": index + 1,
            "path": str(self.paths[index]),
        }
