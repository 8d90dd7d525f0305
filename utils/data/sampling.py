"""Batch sampling for detection datasets, in plain PyTorch terms."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from utils.base.errors import ConfigError, ImageError
from utils.base.files import CACHE_ROOT

ORIENTATIONS_DIR = CACHE_ROOT / "orientations"


def orientations(dataset: Dataset) -> np.ndarray:
    """Whether each image is portrait (height > width), as mmdet's AspectRatioBatchSampler reads
    it from `get_data_info`.

    That unpickles every image's entry (16 s for COCO train2017); mmengine's sampler pays it over
    the first epoch, ours before the first batch. So it is kept per host, by the content of the
    dataset's serialized entries: later runs and the host's other ranks read it back.
    """
    data = getattr(dataset, "data_bytes", None)
    if not getattr(dataset, "serialize_data", False) or not isinstance(data, np.ndarray):
        return _read_orientations(dataset)  # a wrapper or an unserialized dataset: no key
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(data)))
    digest.update(np.asarray(dataset.data_address).tobytes())
    path = ORIENTATIONS_DIR / f"{digest.hexdigest()}.npy"
    try:
        portrait = np.load(path)
        if portrait.shape == (len(dataset),) and portrait.dtype == bool:
            return portrait
    except (OSError, ValueError):  # none yet, or a damaged file: read them again
        pass
    portrait = _read_orientations(dataset)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        with open(partial, "wb") as file:
            np.save(file, portrait)
        partial.replace(path)  # whole or not at all, for the other ranks
    except OSError:  # an unwritable cache: nothing kept
        pass
    return portrait


def _read_orientations(dataset: Dataset) -> np.ndarray:
    return np.array(
        [(info := dataset.get_data_info(i))["height"] > info["width"] for i in range(len(dataset))],
        dtype=bool,
    )


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled global batches of images with the same orientation, cut into per-rank slices.

    On one rank the batches are those of mmengine's DefaultSampler(shuffle=True, seed) under
    mmdet's AspectRatioBatchSampler, epoch by epoch. Each pass is a function of (seed, pass
    number), so a training engine can repeat it, hand consecutive slices to ranks 0..N-1
    (Determined deals whole batches round-robin) and skip the batches already trained when a run
    resumes. Every optimizer step then sees the same images whatever the number of ranks. It
    yields `(pass, index)` keys for `SeededDataset`.

    Args:
        dataset: an mmdet dataset (`get_data_info(i)` gives `width` and `height`).
        batch_size: images per rank and step.
        seed: the run's seed.
        num_replicas: ranks sharing each global batch.
        rank: the rank whose slices to yield; None: every rank's, in turn (for an engine that
            deals them to ranks round-robin, as Determined does).
        skip: slices of the yielded stream to skip first, for resumes the engine does not skip.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        skip: int = 0,
        rank: int | None = None,
    ) -> None:
        if rank is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas}).")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.portrait = orientations(dataset)
        self.passes, self.skip = divmod(skip, len(self))

    def __len__(self) -> int:
        global_batches = -(-len(self.portrait) // (self.batch_size * self.num_replicas))
        return global_batches * (self.num_replicas if self.rank is None else 1)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        slices = self.slices_of_pass(self.passes)
        if self.rank is not None:
            slices = slices[self.rank :: self.num_replicas]
        self.passes += 1
        skip, self.skip = self.skip, 0
        yield from slices[skip:]

    def slices_of_pass(self, this_pass: int) -> list[list[tuple[int, int]]]:
        """The pass's global batches, each cut into `num_replicas` consecutive slices."""
        global_batch = self.batch_size * self.num_replicas
        # mmengine's DefaultSampler order for epoch `this_pass`: the same generator and seed.
        generator = torch.Generator().manual_seed(self.seed + this_pass)
        order = torch.randperm(len(self.portrait), generator=generator).tolist()
        batches: list[list[tuple[int, int]]] = []
        # Portrait first, as in mmdet's buckets: the leftovers fill the last batches in this order.
        buckets: tuple[list[tuple[int, int]], ...] = ([], [])
        for index in order:
            bucket = buckets[0 if self.portrait[index] else 1]
            bucket.append((this_pass, int(index)))
            if len(bucket) == global_batch:
                batches.append(bucket.copy())
                bucket.clear()
        # The leftovers of both orientations fill the pass's last batches, as mmdet does.
        rest = buckets[0] + buckets[1]
        batches += [rest[i : i + global_batch] for i in range(0, len(rest), global_batch)]
        slices = []
        for batch in batches:
            # A short last batch is padded by repeating its images so that every rank gets a
            # slice of the same size, as torch's DistributedSampler pads.
            size = -(-len(batch) // self.num_replicas)
            batch = (batch * self.num_replicas)[: size * self.num_replicas]
            slices += [batch[r * size : (r + 1) * size] for r in range(self.num_replicas)]
        return slices


class SeededDataset(Dataset):
    """Runs the random transforms of sample `(pass, index)` from a seed derived from both.

    mmdet's transforms draw from the global `numpy.random` and `random`; seeding them per sample
    makes the augmentation of a batch independent of worker count and of where a run resumed.
    `pipelines` (a `utils.training.hooks.PipelineSchedule`) sets the pipeline of the sample's
    epoch first.
    """

    def __init__(self, dataset: Dataset, seed: int, pipelines: Any = None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.pipelines = pipelines

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        this_pass, index = key
        if self.pipelines is not None:
            self.pipelines.select(this_pass)
        sample_seed = np.random.SeedSequence([self.seed, this_pass, index]).generate_state(1)[0]
        if get_worker_info() is not None:
            # A worker's generators serve only its samples, each reseeded: nothing to restore
            # (saving numpy's state would cost more than the seeding).
            np.random.seed(sample_seed)
            random.seed(int(sample_seed))
            return self.dataset[index]
        np_state, py_state = np.random.get_state(), random.getstate()
        np.random.seed(sample_seed)
        random.seed(int(sample_seed))
        try:
            return self.dataset[index]
        finally:
            # In the main process (no workers) leave the global generators as they were.
            np.random.set_state(np_state)
            random.setstate(py_state)


class LoudDataset(Dataset):
    """Re-raises a sample's loading error with the image path and what to do about it.

    mmcv's errors for an unreadable image do not always name the file (a zero-byte image fails
    inside OpenCV), and inside a data loader worker the failing sample is hard to find. A
    transform that fails after the image loaded is named under `key` (the dataset's config key)
    instead: its settings, not the file, are the likely cause.
    """

    def __init__(self, dataset: Dataset, key: str = "dataset") -> None:
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def get_data_info(self, index: int) -> dict:
        return self.dataset.get_data_info(index)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as err:
            leaf, leaf_index, leaf_key = leaf_of(self.dataset, index, self.key)
            path = leaf.get_data_info(leaf_index).get("img_path", f"sample {leaf_index}")
            found = Stepwise(leaf)[leaf_index]
            if found is not None and not type(found[1]).__name__.startswith("Load"):
                position, transform, cause = found
                raise ConfigError(
                    f"{leaf_key}.pipeline.{position} ({type(transform).__name__}) fails on {path} "
                    f"({type(cause).__name__}: {cause}). Check that transform's settings and its "
                    "place in the pipeline."
                ) from err
            raise ImageError(
                f"{path}: cannot load it ({type(err).__name__}: {err}). Replace the file, or drop "
                "the image from the annotation file."
            ) from err


class Stepwise:
    """A dataset's pipeline run one transform at a time: the first failing one, or None."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, index: int) -> tuple[int, Any, Exception] | None:
        results = self.dataset.get_data_info(index)
        for position, transform in enumerate(self.dataset.pipeline.transforms):
            try:
                results = transform(results)
            except Exception as err:
                return position, transform, err
            if results is None:  # a transform that filters the sample out
                return None
        return None


def leaf_of(dataset: Any, index: int, key: str) -> tuple[Any, int, str]:
    """The dataset inside wrappers that holds sample `index`, its index there and config key."""
    while True:
        if hasattr(dataset, "datasets"):  # ConcatDataset
            which, index = dataset._get_ori_dataset_idx(index)
            dataset, key = dataset.datasets[which], f"{key}.datasets.{which}"
        elif hasattr(dataset, "dataset"):  # Repeat, ClassBalanced, MultiImageMix
            if hasattr(dataset, "repeat_indices"):
                index = dataset.repeat_indices[index]
            dataset, key = dataset.dataset, f"{key}.dataset"
            index %= len(dataset)
        else:
            return dataset, index, key


class LoaderSeedDraws:
    """Draws from the global torch generator where mmengine's runner starts its data loaders.

    Each new torch DataLoader iterator takes its workers' base seed from the global generator:
    mmengine's runner starts one per training epoch and per validation (only the first of each
    when the loader keeps persistent workers). The trial's loaders draw from their own generators
    (exact resumes), so it calls these at the same points, and the model's own random draws
    (e.g. the RPN and RoI samplers of Mask R-CNN) follow mmengine's stream for the same seed.

    Args:
        train_persistent: mmengine would keep the training loader's workers between epochs.
        val_persistent: the same for the validation loader.
        epoch_length: batches per training epoch.
    """

    def __init__(self, train_persistent: bool, val_persistent: bool, epoch_length: int) -> None:
        self.train_persistent = train_persistent
        self.val_persistent = val_persistent
        self.epoch_length = epoch_length

    def before_train_batch(self, trained: int) -> None:
        """Before the batch that follows `trained` batches of the run."""
        if trained % self.epoch_length == 0 and not (self.train_persistent and trained > 0):
            draw_loader_seed()

    def before_validation(self, first: bool) -> None:
        """Before a validation; `first`: the run's first one."""
        if first or not self.val_persistent:
            draw_loader_seed()


def draw_loader_seed() -> None:
    """What a new torch DataLoader iterator without a generator of its own takes from torch."""
    torch.empty((), dtype=torch.int64).random_()
