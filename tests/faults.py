"""Faults for tests of Ray's restarts, run inside a Ray worker (`WorkerSpec.batch_hook`)."""

from __future__ import annotations

import os
from pathlib import Path


def die_once(at_batch: int, rank: int, marker: str, batch_index: int, worker_rank: int) -> None:
    """Before batch `at_batch` (from 0), worker `rank`'s process ends at once, as a crashed
    worker's does, the first time only (`marker` records that it did)."""
    if batch_index != at_batch or worker_rank != rank or Path(marker).exists():
        return
    import ray.train

    # Once Ray has registered the checkpoints reported so far: a crash right after a report
    # would otherwise race the controller's registration of it.
    assert ray.train.get_all_reported_checkpoints(timeout_s=120), "no checkpoint before the fault"
    Path(marker).write_text("the fault ran\n")
    os._exit(1)
