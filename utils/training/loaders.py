"""The data loaders of a training session, for any engine: the training batches (grouped by
orientation, seeded, skipping what a resumed run trained) and the validation batches (dealt to
the ranks so that each image is predicted in the same batch whatever the ranks). `session` is a
`utils.training.session.TrainingSession`, which imports this module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from utils.base.errors import DataError
from utils.config.tree import base_dataset
from utils.data.sampling import GroupedBatchSampler, LoudDataset, SeededDataset


def train_loader(
    session: Any, loader_class: Callable[..., Any] = DataLoader, rank: int | None = None
) -> Any:
    """The training batches of `rank` (its slice of every global batch); with `rank=None`
    every rank's slice in turn, for an engine that deals them to ranks itself."""
    loader_cfg = session.cfg.train_dataloader
    replicas = session.world_size
    sampler = GroupedBatchSampler(
        session.train_dataset,
        session.cfg.train_dataloader.batch_size,
        seed=session.seed,
        num_replicas=replicas,
        rank=rank,
        skip=session.resumed_batches * (replicas if rank is None else 1),
    )
    dataset = LoudDataset(session.train_dataset, "train_dataloader.dataset")
    return loader_class(
        SeededDataset(dataset, session.seed, session.pipelines),
        batch_sampler=sampler,
        **_options(session, loader_cfg),
    )


def val_loader(
    session: Any, loader_class: Callable[..., Any] = DataLoader, rank: int | None = None
) -> Any:
    """The validation batches of `rank`: the images in order, in batches of the config's
    size, dealt to the ranks round-robin, so that each image is predicted in the same batch
    whatever the ranks (mmdet pads a batch to its largest image); with `rank=None` all the
    batches, for an engine that deals them itself in the same way (Determined)."""
    loader_cfg = session.cfg.val_dataloader
    replicas = session.world_size
    size = len(session.val_dataset)
    if size < replicas:
        raise DataError(
            f"The validation set has {size} images, fewer than the {replicas} processes "
            "that share it: use a larger set or fewer slots."
        )
    # None of the ranks may be left without a batch.
    batch_size = min(loader_cfg.get("batch_size", 1), -(-size // replicas))
    options = _options(session, loader_cfg)
    dataset = LoudDataset(session.val_dataset, "val_dataloader.dataset")
    if rank is None:
        return loader_class(dataset, batch_size=batch_size, shuffle=False, **options)
    batches = list(BatchSampler(SequentialSampler(range(size)), batch_size, drop_last=False))
    return loader_class(dataset, batch_sampler=batches[rank::replicas], **options)


def _options(session: Any, loader_cfg: Any) -> dict[str, Any]:
    workers = loader_cfg.get("num_workers", 0)
    return dict(
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=pseudo_collate,
        worker_init_fn=loader_worker_init(session.cfg),
        # Workers' seeds come from here, not from the global generator: exact resumes.
        generator=torch.Generator().manual_seed(session.seed),
    )


def keeps_workers(loader_cfg: Any) -> bool:
    """Whether mmengine's runner keeps this loader's workers (and iterator) between passes."""
    return bool(loader_cfg.get("persistent_workers")) and loader_cfg.get("num_workers", 0) > 0


def loader_worker_init(cfg: Config) -> Callable[[int], None] | None:
    """What each data loader worker runs first: with data on GCS, registering the gs:// file
    backend (a forked worker inherits it, a spawned one starts without it)."""
    root = str(base_dataset(cfg.train_dataloader.dataset).get("data_root") or "")
    if not root.startswith("gs://"):
        return None
    from utils.data.gcs import register_gcs_backend

    return register_gcs_backend
