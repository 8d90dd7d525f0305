"""The start-up sanity pass: the run's code on a few real images before its first training batch.

One training step (the training pipeline, forward, loss, backward) and one small validation (the
val pipeline, predict, the evaluator's update and its evaluation of those predictions), on images
taken straight from the datasets: the loaders and their samplers are not touched. Everything the
pass changes is put back (gradients, buffers, the modules' attributes and modes, the evaluator,
the random generators of Python, NumPy and torch), and the optimizer does not step, so weights,
optimizer state, loss scaler, LR schedule, averaged weights and loop position are never reached.
A run that would fail at its first batch, inside a loader worker, or only at its first validation
hours later, fails here instead with one line (`StageError`): the stage, the transform or module
to look at, and the image.

Every rank runs its own images: the pass needs no collective of its own (a model with SyncBN or
mmdet's BatchSyncRandomResize meets the same collectives on every rank), each rank's device and
data are proven, and a rank that fails ends the run as any failing rank does.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mmengine.dataset import pseudo_collate

from utils.base.errors import ConfigError, StageError
from utils.data.datasets import build_dataset
from utils.data.sampling import SeededDataset
from utils.evaluation.evaluator import CocoEvaluator
from utils.evaluation.preflight import evaluation_problems
from utils.training.diagnosis import (
    TRAINING,
    VALIDATION,
    evaluator_failure,
    model_failure,
    pipeline_failure,
    prediction_failure,
)
from utils.training.hooks import publish_runtime_info
from utils.training.optim import amp_settings
from utils.training.plan import RunPlan
from utils.training.session import TrainingSession, config_seed

logger = logging.getLogger(__name__)
SWITCH = "sanity_pass"  # the hyperparameter that turns the pass off


@dataclass
class SanityParts:
    """What the pass runs: a session's objects, or `--check`'s. `detector` is the bare one (no
    engine's wrapper: no gradient sync); `position` is `(iteration, epoch, max_iters,
    max_epochs)` of the run's next batch, as the loop publishes it (some models read it);
    `images`: per batch, at most."""

    cfg: Any
    detector: torch.nn.Module
    train_dataset: Any
    val_dataset: Any
    evaluator: CocoEvaluator
    position: tuple[int, int, int, int]
    seed: int = 0
    rank: int = 0
    pipelines: Any = None
    amp: Any = None
    images: int = 2


def enabled(hparams: dict[str, Any]) -> bool:
    """`hyperparameters.sanity_pass` (default true)."""
    value = hparams.get(SWITCH, True)
    if not isinstance(value, bool):
        raise ConfigError(f"hyperparameters.{SWITCH} is {value!r}: write true or false.")
    return value


def run_sanity_pass(session: TrainingSession) -> float | None:
    """The session's pass, on this rank's images; its seconds, or None when switched off."""
    if not enabled(session.plan.hparams):
        logger.info("hyperparameters.%s is false: no sanity pass.", SWITCH)
        return None
    index = session.batches_trained
    schedule = session.schedule
    position = (index, schedule.epoch_of(index), schedule.max_batches, schedule.max_epochs)
    parts = SanityParts(
        session.cfg, session.detector, session.train_dataset, session.val_dataset,
        session.evaluator, position, session.seed, session.rank, session.pipelines, session.amp,
    )  # fmt: skip
    return sanity_pass(parts)


def sanity_problems(plan: RunPlan, model: torch.nn.Module) -> list[str]:
    """`--check`'s pass, on the CPU and one image a batch, with `model` (no weights loaded) and
    the datasets and evaluator of a plan whose data is here and prepared: its failure, or none."""
    cfg = plan.cfg
    if not enabled(plan.hparams) or evaluation_problems(cfg, model):
        return []  # switched off, or the check reports what the validation would fail on
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    evaluator = CocoEvaluator(
        cfg,
        plan.hparams.get("coco_backend"),
        plan.hparams.get("streamed_evaluation"),
        meta=val.metainfo,
    )
    schedule = plan.schedule(len(train))
    position = (0, 0, schedule.max_batches, schedule.max_epochs)
    seed, amp = config_seed(cfg) or 0, amp_settings(cfg, cuda=False)
    try:
        sanity_pass(
            SanityParts(cfg, model, train, val, evaluator, position, seed, amp=amp, images=1)
        )
    except StageError as err:
        return [str(err)]
    return []


def sanity_pass(parts: SanityParts) -> float:
    """One training step and one validation on `parts`, leaving no trace; their seconds.
    Raises StageError naming the stage, the transform or module, and the images."""
    start = time.perf_counter()
    with no_trace(parts):
        publish_runtime_info(*parts.position)  # what the first batch publishes before its loss
        batch = load(parts, "train", parts.train_dataset)
        training_step(parts, batch)
        validation(parts, load(parts, "val", parts.val_dataset))
    seconds = time.perf_counter() - start
    logger.info("Sanity pass: a training step and a validation ran in %.1f s.", seconds)
    return seconds


@contextlib.contextmanager
def no_trace(parts: SanityParts) -> Iterator[None]:
    """Everything the pass may change, as it was: the generators, gradients, buffers, and the own
    attributes of the modules (modes, caches, e.g. TOOD's epoch), the evaluator and its metrics,
    and the datasets (the pipeline of an epoch, YOLOX's skipped transforms)."""
    detector, evaluator = parts.detector, parts.evaluator
    generators = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    grads = {p: None if p.grad is None else p.grad.clone() for p in detector.parameters()}
    buffers = [(b, b.clone()) for b in detector.buffers()]
    # Shallow: a module's parameter, buffer, submodule and hook dicts stay the same objects.
    owners = [*detector.modules(), parts.train_dataset, parts.val_dataset]
    attributes = [(o, dict(vars(o))) for o in owners]
    # The evaluator's lists and dicts copied too: a metric's `process` appends to its results.
    attributes += [
        (o, {k: copy.copy(v) if isinstance(v, list | dict) else v for k, v in vars(o).items()})
        for o in [evaluator, *evaluator.metrics]
    ]
    previous_disable = logging.root.manager.disable
    logging.disable(logging.WARNING)  # mmdet's warnings about an untrained model's predictions
    try:
        yield
    finally:
        logging.disable(previous_disable)
        random.setstate(generators[0])
        np.random.set_state(generators[1])
        torch.set_rng_state(generators[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        with torch.no_grad():
            for param, grad in grads.items():
                param.grad = grad
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for owner, saved in attributes:
            owner.__dict__.clear()
            owner.__dict__.update(saved)


def load(parts: SanityParts, split: str, dataset: Any) -> dict[str, Any]:
    """This rank's first images of `split`, through its pipeline, collated in this process."""
    count = min(parts.images, parts.cfg[f"{split}_dataloader"].get("batch_size", 1))
    first = parts.rank * count
    indices = [(first + i) % len(dataset) for i in range(count)]
    key = f"{split}_dataloader.dataset"
    stage = TRAINING if split == "train" else VALIDATION
    # Seeded as the training loader seeds a sample of the first epoch (generators put back).
    seeded = SeededDataset(dataset, parts.seed, parts.pipelines if split == "train" else None)
    samples = []
    for index in indices:
        try:
            samples.append(seeded[(0, index)])
        except Exception as err:
            raise StageError(pipeline_failure(stage, dataset, index, key, parts.seed, err)) from err
    return pseudo_collate(samples)


def training_step(parts: SanityParts, batch: dict[str, Any]) -> None:
    """Forward, loss and backward as the loop runs them (no optimizer step, no loss scaler)."""
    detector = parts.detector
    detector.train()  # as the engines do before training (e.g. mmdet's norm_eval)
    try:
        data = detector.data_preprocessor(batch, training=True)
        with parts.amp.autocast() if parts.amp else contextlib.nullcontext():
            losses = detector(**data, mode="loss")
        loss, _ = detector.parse_losses(losses)
        loss.backward()
    except Exception as err:
        raise StageError(model_failure(TRAINING, detector, batch, err)) from err


def validation(parts: SanityParts, batch: dict[str, Any]) -> None:
    """Predict, the evaluator's update, and its evaluation of those images alone."""
    detector, evaluator = parts.detector, parts.evaluator
    detector.eval()
    try:
        with torch.no_grad():
            data = detector.data_preprocessor(batch, training=False)
            predictions = detector(**data, mode="predict")
    except Exception as err:
        message = prediction_failure(detector, parts.val_dataset, batch, err)
        raise StageError(message) from err
    evaluator.reset()
    try:
        evaluator.update(predictions)
    except Exception as err:
        raise StageError(evaluator_failure("update", batch, err)) from err
    ids = [sample.metainfo.get("img_id") for sample in batch["data_samples"]]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the COCO engine's index and table
            for metric in evaluator.metrics:  # COCO: these images alone, on their own copy
                coco = getattr(metric, "_coco_api", None)
                if coco is not None:  # the engines write into the ground truth they evaluate
                    metric._coco_api = type(coco)(ground_truth(coco, ids))
                if hasattr(metric, "img_ids"):
                    metric.img_ids = ids
            evaluator.compute([evaluator.entries])
    except Exception as err:
        raise StageError(evaluator_failure("evaluation", batch, err)) from err


def ground_truth(coco: Any, ids: list[Any]) -> dict[str, Any]:
    """A copy of a COCO index's ground truth of images `ids` (and its categories)."""
    images = copy.deepcopy(coco.loadImgs(ids))
    # pycocotools' API, which every COCO engine's index answers.
    annotations = copy.deepcopy(coco.loadAnns(coco.getAnnIds(imgIds=ids)))
    return {**coco.dataset, "images": images, "annotations": annotations}
