"""The `gs://` MMEngine file backend and annotation downloads from Google Cloud Storage.

`register_gcs_backend()` registers `GCSBackend` as the backend `gcs`, also chosen for every
`gs://bucket/object` path, so a dataset with `data_root='gs://bucket/prefix/'` loads through
mmcv's unchanged `LoadImageFromFile`. Other paths handed to the backend (e.g. an annotation file
already in the local cache) are read from the local disk. Reads, retries and errors are
`utils.data.gcs_client`'s; its names the package uses are importable from here too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import posixpath
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmengine.fileio import BaseStorageBackend, LocalBackend, register_backend

from utils.base.files import CACHE_ROOT
from utils.data.gcs_client import (
    SCHEME,
    GCSBucketNotFoundError,
    GCSError,
    GCSNotFoundError,
    GCSPermissionError,
    RetryPolicy,
    download_object,
    get_client,
    read_object,
    reset_stats,
    split_path,
    stats,
)

__all__ = [
    "GCSBackend",
    "GCSBucketNotFoundError",
    "GCSError",
    "GCSNotFoundError",
    "GCSPermissionError",
    "RetryPolicy",
    "cached_path",
    "download_annotations",
    "get_client",
    "read_object",
    "register_gcs_backend",
    "reset_stats",
    "split_path",
    "stats",
]

logger = logging.getLogger(__name__)
LOCK_NAME = ".gcs-download.lock"
DEFAULT_CACHE = CACHE_ROOT / "gcs"


def cached_path(cache_dir: Path, bucket: str, name: str) -> Path:
    """Where `download_annotations` keeps object `name` of `bucket`: known before it downloads."""
    if name.startswith("/") or ".." in Path(name).parts:
        raise ValueError(f"object name {name!r} would leave the cache folder")
    return Path(cache_dir) / bucket / name


def download_annotations(
    bucket: str, blob_names: list[str], cache_dir: Path, policy: RetryPolicy | None = None
) -> list[Path]:
    """Download objects of `bucket` to `cache_dir/bucket/<name>` once per host; return the paths.

    An exclusive `flock` on `cache_dir/.gcs-download.lock` serialises the processes of a host: one
    downloads while the others wait, then find the files complete (size, and mtime = the object's
    update time, equal) and only check the metadata.
    """
    policy = policy or RetryPolicy()
    cache_dir = Path(cache_dir)
    (cache_dir / bucket).mkdir(parents=True, exist_ok=True)
    paths = []
    with open(cache_dir / LOCK_NAME, "a") as lock:
        # Blocks until the holder is done; the kernel drops the lock if the holder dies.
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in blob_names:
            target = cached_path(cache_dir, bucket, name)
            if download_object(bucket, name, target, policy):
                logger.info("Downloaded %s%s/%s to %s.", SCHEME, bucket, name, target)
            paths.append(target)
    return paths


class GCSBackend(BaseStorageBackend):
    """MMEngine storage backend for `gs://bucket/object`; other paths are read from local disk.

    Args (the keys of `backend_args` besides `backend='gcs'`):
        cache_bytes: bound of this process's in-memory LRU of image bytes (0: off). Each
            data-loader worker has its own, so the total is up to workers x cache_bytes.
        cache_dir: where `get_local_path` (annotation files) keeps its copies.
        retry: `RetryPolicy` fields (max_attempts, base_delay, max_delay, timeout).
    """

    def __init__(self, cache_bytes: int = 0, cache_dir: str | None = None, **retry: Any) -> None:
        self.policy = RetryPolicy(**retry)
        self.cache_bytes, self.cached = cache_bytes, 0
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.local = LocalBackend()

    def get(self, filepath: str | Path) -> bytes:
        """The object's bytes (from the cache when there)."""
        path = str(filepath)
        if not path.startswith(SCHEME):
            return self.local.get(path)
        if path in self.cache:
            stats().cache_hits += 1
            self.cache.move_to_end(path)
            return self.cache[path]
        data = read_object(*split_path(path), self.policy)
        if len(data) <= self.cache_bytes:
            self.cache[path] = data
            self.cached += len(data)
            while self.cached > self.cache_bytes:  # evict the least recently used
                self.cached -= len(self.cache.popitem(last=False)[1])
        return data

    def get_text(self, filepath: str | Path, encoding: str = "utf-8") -> str:
        """The object decoded as text."""
        if not str(filepath).startswith(SCHEME):
            return self.local.get_text(filepath, encoding)
        return self.get(filepath).decode(encoding)

    def join_path(self, filepath: str | Path, *filepaths: str | Path) -> str:
        """Join with `/` (`BaseDataset` uses it to put `data_root` before `data_prefix`)."""
        return posixpath.join(str(filepath), *map(str, filepaths))

    @contextlib.contextmanager
    def get_local_path(self, filepath: str | Path) -> Iterator[str]:
        """A local copy of the object, kept in `cache_dir` (see `download_annotations`)."""
        if not str(filepath).startswith(SCHEME):
            with self.local.get_local_path(filepath) as path:
                yield str(path)
            return
        bucket, name = split_path(str(filepath))
        yield str(download_annotations(bucket, [name], self.cache_dir, self.policy)[0])


def register_gcs_backend(worker_id: int | None = None) -> None:
    """Register `GCSBackend` with MMEngine's file backends as `gcs` and for `gs://`; idempotent.

    Called where a run's gs:// data is prepared (`utils.data.prepare.prepare_source`, in every
    process that builds datasets: a plan shipped to another process carries no registration). A
    data-loader worker started by fork inherits the registration; one started by spawn or
    forkserver (a config's `env_cfg.mp_cfg.mp_start_method`) must register again: pass this
    function as the loader's `worker_init_fn` (`worker_id` is what the loader passes; unused).
    """
    # force: registering again, or after a re-import of this module, replaces the entry.
    register_backend("gcs", GCSBackend, force=True, prefixes="gs")
