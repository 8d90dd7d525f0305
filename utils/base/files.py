"""Where the package keeps files on a host, and how it reads checkpoints safely.

- `CACHE_ROOT`: one cache root per host (generated data, downloaded weights, GCS objects,
  fetched checkpoints), under `$XDG_CACHE_HOME`.
- `safe_load`: `torch.load` with `weights_only=True` and one allow-list for what mmengine and
  training engines store besides tensors (numpy arrays and RNG states, mmengine's ConfigDict and
  HistoryBuffer): unpickling calls nothing else.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.base.errors import WeightsError

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmdet-determined"


def _history_buffer_method(owner: Any, name: str) -> Any:
    """Stands in for `builtins.getattr`, with which HistoryBuffer pickles its statistic methods:
    the real one would let a malicious pickle reach any attribute (e.g. `__globals__`)."""
    from mmengine.logging import HistoryBuffer

    if owner is not HistoryBuffer or name.startswith("_"):
        raise pickle.UnpicklingError(f"getattr({owner!r}, {name!r}) is not allowed")
    return getattr(HistoryBuffer, name, None)


def numpy_globals() -> list[Any]:
    """numpy's arrays, dtypes and RNG states (Determined's checkpoints hold numpy's RNG state)."""
    core = np._core.multiarray
    allowed: list[Any] = [np.ndarray, np.dtype, core._reconstruct]
    allowed += [getattr(np.dtypes, name) for name in np.dtypes.__all__]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 and 1 files
        allowed += [(core._reconstruct, f"{mod}._reconstruct"), (core.scalar, f"{mod}.scalar")]
    return allowed


def checkpoint_globals() -> list[Any]:
    """Everything `safe_load` allows: numpy's, and what mmengine's checkpoints hold."""
    from mmengine.config import ConfigDict
    from mmengine.logging import HistoryBuffer

    return [
        *numpy_globals(),
        ConfigDict,
        HistoryBuffer,
        (_history_buffer_method, "builtins.getattr"),
    ]


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load(path)` on the CPU with `weights_only=True` and `checkpoint_globals()`;
    `mmap`: tensors stay in the file until read (for a look at a checkpoint's small entries)."""
    # Only those not allowed yet: leaving the context removes what it added, and must not take
    # away a process-wide allowance (`allow_numpy_globals`).
    already = set(torch.serialization.get_safe_globals())
    missing = [item for item in checkpoint_globals() if item not in already]
    with torch.serialization.safe_globals(missing):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def not_a_checkpoint(path: Path, exc: Exception) -> WeightsError:
    """The error to raise when `safe_load(path)` failed with `exc`: what the file holds that a
    safe load refuses, or why it is no checkpoint."""
    text = str(exc)
    unsafe = re.search(r"GLOBAL (\S+) (was not an allowed global|whose module)", text)
    if unsafe:
        return WeightsError(
            f"{path} holds {unsafe.group(1)}, which is not among the types allowed for a safe "
            "load. If you trust the file, keep just its weights: torch.save({'state_dict': "
            "torch.load(path, weights_only=False)['state_dict']}, new_path)."
        )
    # torch wraps the cause in paragraphs of advice about weights_only: keep the cause.
    causes = [part.strip() for part in text.split("\n\n") if "weights_only" not in part]
    cause = next((c for c in causes if c), "the file ends too early")
    return WeightsError(
        f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {cause.splitlines()[0]})"
    )


def allow_numpy_globals() -> None:
    """Process-wide: engines that restore their own checkpoints with torch.load's default
    `weights_only=True` (Determined 0.38 on torch >= 2.6) must accept numpy's RNG state."""
    already = set(torch.serialization.get_safe_globals())
    torch.serialization.add_safe_globals([g for g in numpy_globals() if g not in already])


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The weights of a DistributedDataParallel-wrapped model under the bare model's names."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key.removeprefix("module."): value for key, value in state_dict.items()}
    return dict(state_dict)
