"""What a failure inside mmdet, mmcv or mmengine means, in one line: the stage (training step or
validation), the transform or module to look at under its config key, and the images.

The start-up sanity pass (`utils/training/sanity.py`) explains every failure this way; a real
validation asks `explain_prediction` about mmdet's bare prediction errors.
"""

from __future__ import annotations

from typing import Any

import torch

from utils.data.sampling import SeededDataset, Stepwise, leaf_of

TRAINING, VALIDATION = "training step", "validation"


def prefix(stage: str) -> str:
    return f"Start-up sanity pass, {stage}: "


def failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else f"a bare {type(err).__name__}"


def images(batch: dict[str, Any]) -> str:
    paths = [sample.metainfo.get("img_path", "?") for sample in batch["data_samples"]]
    return ", ".join(dict.fromkeys(str(path) for path in paths))


def pipeline_failure(
    stage: str, dataset: Any, index: int, key: str, seed: int, err: BaseException
) -> str:
    """The failing transform, found by running the sample's pipeline one transform at a time."""
    leaf, leaf_index, leaf_key = leaf_of(dataset, index, key)
    path = leaf.get_data_info(leaf_index).get("img_path", f"sample {leaf_index}")
    found = SeededDataset(Stepwise(leaf), seed)[(0, leaf_index)]
    if found is None:  # the leaf's pipeline passes: a wrapper's own (e.g. Mosaic's) fails
        where, cause = f"{key}.pipeline", err
    else:
        position, transform, cause = found
        where = f"{leaf_key}.pipeline.{position} ({type(transform).__name__})"
    return (
        f"{prefix(stage)}{where} fails on {path}: {failure(cause)}. Check that transform's "
        "settings and its place in the pipeline."
    )


def model_failure(stage: str, detector: torch.nn.Module, batch: Any, err: BaseException) -> str:
    return (
        f"{prefix(stage)}{failing_module(detector, err)} fails on {images(batch)}: "
        f"{failure(err)}. Check that part of the config's `model` and what the pipeline gives it."
    )


def failing_module(detector: torch.nn.Module, err: BaseException) -> str:
    """The deepest module of `detector` in the error's traceback, under its config key."""
    names = {id(module): name for name, module in detector.named_modules()}
    name, module = None, None
    trace = err.__traceback__
    while trace is not None:
        candidate = trace.tb_frame.f_locals.get("self")
        if id(candidate) in names:
            name, module = names[id(candidate)], candidate
        trace = trace.tb_next
    if module is None:  # e.g. in autograd's backward: no module's frame
        return f"the model ({type(detector).__name__})"
    return f"model{'.' + name if name else ''} ({type(module).__name__})"


def evaluator_failure(what: str, batch: Any, err: BaseException) -> str:
    return (
        f"{prefix(VALIDATION)}val_evaluator fails in its {what} of the predictions for "
        f"{images(batch)}: {failure(err)}. Check val_evaluator in the config."
    )


def prediction_failure(
    detector: torch.nn.Module, val_dataset: Any, batch: dict[str, Any], err: BaseException
) -> str:
    """A failed prediction of the sanity pass: its known cause, else the failing module."""
    known = explain_prediction(err, batch, detector, val_dataset)
    if known is None:
        return model_failure(VALIDATION, detector, batch, err)
    return prefix(VALIDATION) + known


def explain_prediction(
    err: BaseException, batch: dict[str, Any], detector: torch.nn.Module, val_dataset: Any
) -> str | None:
    """What mmdet's bare prediction error means where the batch shows its cause, with the module
    and images; None when it does not (the sanity pass and every validation ask)."""
    known = known_cause(batch, val_dataset)
    if known is None:
        return None
    return f"{known} ({failure(err)} in {failing_module(detector, err)} on {images(batch)})."


def known_cause(batch: dict[str, Any], val_dataset: Any) -> str | None:
    """The cause of a failed prediction, where the batch shows it."""
    if all("scale_factor" in sample.metainfo for sample in batch["data_samples"]):
        return None
    leaf, _, key = leaf_of(val_dataset, 0, "val_dataloader.dataset")
    names = [type(t).__name__ for t in getattr(leaf.pipeline, "transforms", [])]
    if not any("Resize" in name for name in names):
        return (
            f"the test pipeline {key}.pipeline has no Resize, so its images carry no "
            "scale_factor and mmdet cannot map the predicted boxes back onto them: add one, "
            "e.g. dict(type='Resize', scale=(1333, 800), keep_ratio=True) after LoadImageFromFile"
        )
    return (
        f"the PackDetInputs of {key}.pipeline leaves scale_factor out of its meta_keys, which "
        "mmdet needs to map the predicted boxes back onto the images: add it"
    )
