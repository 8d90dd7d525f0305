"""Pretrained detector weights for a trial (hyperparameter `load_from`): fetch, read safely, load.

`load_from` may be a local path, an http(s) URL (e.g. the mmdet model zoo) or `gs://bucket/object`.
Remote files are downloaded once per host into a cache folder. Backbone-only weights (ImageNet)
are not for this module: they stay with the config's `init_cfg`, applied by `init_weights()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import torch
from mmengine.config import ConfigDict
from mmengine.logging import HistoryBuffer

logger = logging.getLogger(__name__)
# Same root as utils.config.DEFAULT_CACHE (not imported, like utils.gcs, to avoid import cycles).
DEFAULT_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmdet-determined" / "weights"
)
LOCK_NAME = ".download.lock"
TIMEOUT = 60.0  # seconds per socket operation
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,})\.pth?$")  # torch hub / mmengine: sha256 prefix
SHOWN = 5  # key names listed in a log line


class WeightsError(RuntimeError):
    """Pretrained weights could not be fetched or read; the message names the file or URL."""


@dataclass(frozen=True)
class LoadReport:
    """What `load_weights` did, in tensors; shape-skipped keys are not counted as missing."""

    path: Path
    loaded: int
    skipped_shape: int
    missing: int
    unexpected: int

    def __str__(self) -> str:
        return (
            f"{self.loaded} tensors loaded from {self.path}, {self.skipped_shape} skipped "
            f"(shape), {self.missing} missing, {self.unexpected} unexpected"
        )


def _history_buffer_method(owner: Any, name: str) -> Any:
    """Stands in for `builtins.getattr`, with which HistoryBuffer pickles its statistic methods.

    The real getattr would let a malicious pickle reach any attribute (e.g. `__globals__`).
    """
    if owner is not HistoryBuffer or name.startswith("_"):
        raise pickle.UnpicklingError(f"getattr({owner!r}, {name!r}) is not allowed")
    return getattr(HistoryBuffer, name, None)


def _safe_globals() -> list[Any]:
    """What mmengine checkpoints hold besides tensors: numpy values, HistoryBuffer, ConfigDict."""
    core = np._core.multiarray
    allowed: list[Any] = [np.ndarray, np.dtype, ConfigDict, HistoryBuffer]
    allowed += [getattr(np.dtypes, name) for name in np.dtypes.__all__]
    allowed.append((_history_buffer_method, "builtins.getattr"))
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 and 1 files
        allowed += [
            (core._reconstruct, f"{module}._reconstruct"),
            (core.scalar, f"{module}.scalar"),
        ]
    return allowed


def _download(url: str, cache_dir: Path) -> Path:
    """Download `url` to `cache_dir/<host>/<path>` once per host; verify a hash in its name."""
    parts = urlsplit(url)
    relative = Path(unquote(parts.path).lstrip("/"))
    if not parts.hostname or not relative.name or ".." in relative.parts:
        raise WeightsError(f"load_from={url!r}: the URL does not name a file")
    host = f"{parts.hostname}_{parts.port}" if parts.port else parts.hostname
    target = cache_dir / host / relative  # per host and path: equal file names do not collide
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / LOCK_NAME, "a") as lock:
        # Ranks of a host queue here; the first downloads, the others find the file. Only a
        # complete, verified file is ever renamed to `target`, so its existence is enough.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            logger.info("Downloading %s to %s.", url, target)
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
                expected_size = resp.headers.get("Content-Length")
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if expected_size is not None and size != int(expected_size):
                raise WeightsError(f"{url}: download cut short ({size} of {expected_size} bytes)")
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
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise WeightsError(f"cannot download {url}: {reason}") from exc
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
        from utils import gcs  # lazily: the Cloud Storage client is only needed here

        bucket, name = gcs.split_path(source)
        return gcs.download_annotations(bucket, [name], cache_dir / "gs")[0]
    if scheme:
        raise WeightsError(
            f"load_from={source!r}: use a path, http(s):// or gs:// (backbone weights such as "
            "torchvision:// or open-mmlab:// belong in the config's init_cfg)."
        )
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"load_from={source!r}: no such file ({path.absolute()})")
    return path


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {list(obj)[:SHOWN]}"
    return f"a {type(obj).__name__}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (`{'state_dict': ...}` or a bare state dict), unwrapped from DDP.

    Read with `weights_only=True`: unpickling runs no code beyond an allow-list of types.
    """
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty, not a PyTorch checkpoint")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # what a wrong file raises varies with its bytes
        text = str(exc)
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        if unsafe:
            raise WeightsError(
                f"{path} holds {unsafe.group(1)}, which is not among the types allowed for a "
                "safe load. If you trust the file, keep just its weights: torch.save("
                "{'state_dict': torch.load(path, weights_only=False)['state_dict']}, new_path)."
            ) from exc
        detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = f"{type(exc).__name__}: {detail[0] if detail else 'truncated file'}"
        raise WeightsError(f"{path} is not a PyTorch checkpoint ({reason})") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    tensors = (
        {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if isinstance(state, dict)
        else {}
    )
    if not tensors:
        raise WeightsError(
            f"{path} holds no weights: expected {{'state_dict': {{name: tensor}}}} or "
            f"{{name: tensor}}, found {_describe(obj)}"
        )
    if all(key.startswith("module.") for key in tensors):  # saved from a DDP-wrapped model
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    return tensors


def load_weights(model: torch.nn.Module, source: str, cache_dir: Path | None = None) -> LoadReport:
    """Load `source` (path, http(s) URL or gs:// object) into `model`, skipping mismatched shapes.

    Tensors whose shape differs from the model's (e.g. a head for other `num_classes`) keep the
    model's initialisation; each is logged. Call after `model.init_weights()`.
    """
    path = resolve(source, cache_dir)
    state = read_state_dict(path)
    own = model.state_dict()
    accepted, skipped = {}, []
    for key, value in state.items():
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
            logger.warning(
                "load_from: %d keys %s %s, e.g. %s", len(keys), label, path, keys[:SHOWN]
            )
    report = LoadReport(
        path=path,
        loaded=len(accepted) - len(result.unexpected_keys),
        skipped_shape=len(skipped),
        missing=len(missing),
        unexpected=len(result.unexpected_keys),
    )
    logger.info("load_from: %s", report)
    return report
