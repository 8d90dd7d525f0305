"""Pretrained detector weights for a trial (hyperparameter `load_from`): fetch, read safely, load.

`load_from` is a local path, an http(s) URL (e.g. the mmdet model zoo) or `gs://bucket/object`;
remote files are downloaded once per host into a cache folder. Backbone-only weights (ImageNet)
are not for this module: they stay with the config's `init_cfg`, applied by `init_weights()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch
from mmengine.logging import MMLogger

from utils.base.errors import WeightsError
from utils.base.files import CACHE_ROOT, not_a_checkpoint, safe_load, strip_module_prefix

logger = logging.getLogger(__name__)
# Set to 1 for mmengine's weight-initialisation messages (one per parameter: ~420 log lines for
# Mask R-CNN), which `init_weights` keeps off the console by default.
INIT_LOG_VARIABLE = "MMDET_DETERMINED_INIT_LOG"
DEFAULT_CACHE = CACHE_ROOT / "weights"
LOCK_NAME = ".download.lock"
TIMEOUT = 60.0  # seconds per socket operation
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,})\.pth?$")  # as torch hub / mmengine: sha256 prefix
SHOWN = 5  # key names listed in a log line


@dataclass(frozen=True)
class LoadReport:
    """What `load_weights` did, in tensors; shape-skipped keys are not counted as missing."""

    path: Path
    loaded: int
    skipped_shape: int
    missing: int
    unexpected: int


def _download(url: str, cache_dir: Path) -> Path:
    """Download `url` to `cache_dir/<host>/<path>` once per host; verify a hash in its name."""
    parts = urlsplit(url)
    relative = Path(unquote(parts.path).lstrip("/"))
    if not parts.hostname or not relative.name or ".." in relative.parts:
        raise WeightsError(f"load_from={url!r}: the URL does not name a file")
    host = f"{parts.hostname}_{parts.port}" if parts.port else parts.hostname
    target = cache_dir / host / relative  # by host and path: equal file names do not collide
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / LOCK_NAME, "a") as lock:
        # The ranks of a host queue here; the first downloads, the others find the file. Only a
        # complete, verified file is ever renamed to `target`, so its existence is enough.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            logger.info("Downloading %s to %s.", url, target)
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
                length = resp.headers.get("Content-Length")
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if length is not None and size != int(length):
                raise WeightsError(f"{url}: download cut short ({size} of {length} bytes)")
            prefix = HASH_SUFFIX.search(target.name)
            if prefix and not digest.hexdigest().startswith(prefix.group(1)):
                raise WeightsError(
                    f"{url}: sha256 {digest.hexdigest()} does not start with {prefix.group(1)} "
                    "as the file name says: corrupt download or wrong file."
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
            os.replace(tmp, target)
        except urllib.error.HTTPError as exc:
            raise WeightsError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
        except OSError as exc:  # URLError (no route, refused, DNS), timeouts, a full disk
            raise WeightsError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return target


def resolve(source: str, cache_dir: Path | None = None) -> Path:
    """The local file for `source`: a path, an http(s) URL or gs://bucket/object."""
    cache_dir = Path(cache_dir or DEFAULT_CACHE).expanduser()
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in ("http", "https"):
        return _download(source, cache_dir)
    if scheme == "gs":
        from utils.data import gcs  # lazily: only gs:// sources need the Cloud Storage client

        bucket, name = gcs.split_path(source)
        try:
            return gcs.download_annotations(bucket, [name], cache_dir / "gs")[0]
        except gcs.GCSNotFoundError as exc:  # its message's hint is about data.bucket
            missing = "bucket" if isinstance(exc, gcs.GCSBucketNotFoundError) else "object"
            raise FileNotFoundError(f"load_from={source!r}: no such {missing}") from exc
    if scheme:
        raise WeightsError(
            f"load_from={source!r}: use a path, http(s):// or gs:// (backbone weights such as "
            "torchvision:// or open-mmlab:// belong in the config's init_cfg)."
        )
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"load_from={source!r}: no such file ({path.absolute()})")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (`{'state_dict': ...}` or a bare state dict), unwrapped from
    DDP. Read with `weights_only=True`: unpickling calls nothing beyond an allow-list."""
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty, not a PyTorch checkpoint")
    try:
        obj = safe_load(path)
    except OSError:
        raise
    except Exception as exc:  # what a wrong file raises varies with its bytes
        raise not_a_checkpoint(path, exc) from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    items = state.items() if isinstance(state, dict) else ()
    tensors = {key: value for key, value in items if isinstance(value, torch.Tensor)}
    if not tensors:
        what = f"keys {list(obj)[:SHOWN]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise WeightsError(f"{path} holds no weights: neither 'state_dict' nor tensors in {what}")
    return strip_module_prefix(tensors)


def load_weights(model: torch.nn.Module, source: str, cache_dir: Path | None = None) -> LoadReport:
    """Load `source` (path, http(s) URL or gs:// object) into `model`; call after init_weights().

    Tensors whose shape differs from the model's (e.g. a head for other `num_classes`) keep the
    model's initialisation, and each is logged; so are missing and unexpected keys.
    """
    path = resolve(source, cache_dir)
    own = model.state_dict()
    accepted, skipped = {}, []
    for key, value in read_state_dict(path).items():
        if key in own and own[key].shape != value.shape:
            skipped.append(key)
            logger.warning(
                "load_from: skipped %s: shape %s in the checkpoint, %s in the model.",
                key, tuple(value.shape), tuple(own[key].shape),
            )  # fmt: skip
        else:
            accepted[key] = value
    result = model.load_state_dict(accepted, strict=False)
    missing = [key for key in result.missing_keys if key not in skipped]
    for label, keys in (("missing from", missing), ("unexpected in", result.unexpected_keys)):
        if keys:
            logger.warning("load_from: %d keys %s %s: %s", len(keys), label, path, keys[:SHOWN])
    report = LoadReport(
        path, len(accepted) - len(result.unexpected_keys), len(skipped), len(missing),
        len(result.unexpected_keys),
    )  # fmt: skip
    logger.info("load_from: %s", report)
    return report


def init_weights(detector: torch.nn.Module) -> None:
    """The detector's `init_weights()`, with mmengine's messages below WARNING kept out of the
    log (its init_cfg of every parameter) unless the environment sets INIT_LOG_VARIABLE to 1."""
    if os.environ.get(INIT_LOG_VARIABLE) == "1":
        detector.init_weights()
        return
    mm_logger = MMLogger.get_current_instance()  # where mmengine's init messages go
    level = mm_logger.level
    mm_logger.setLevel(logging.WARNING)
    try:
        detector.init_weights()
    finally:
        mm_logger.setLevel(level)
