"""The config's `val_evaluator`, which mmengine lets be one metric or a list of them."""

from __future__ import annotations

from typing import Any


def evaluator_configs(evaluator: Any) -> list[Any]:
    """The metric configs of a `val_evaluator` (one mapping, a list of them, or None) as a list;
    the items are the config's own, so changing one changes the config."""
    if evaluator is None:
        return []
    return list(evaluator) if isinstance(evaluator, list | tuple) else [evaluator]
