"""Pictures of detections: ground truth and predictions drawn by MMDetection's own visualizer.

`draw_sample` draws one image; `render_samples` re-predicts a fixed set of validation images and
draws each with its ground truth on the left and the predictions on the right.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import mmcv
import numpy as np
import torch
from mmcv.transforms import LoadImageFromFile
from mmdet.registry import VISUALIZERS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks, PolygonMasks
from mmengine.dataset import pseudo_collate
from mmengine.structures import InstanceData

from utils.base.errors import ConfigError

logger = logging.getLogger(__name__)
DEFAULTS = {"num_images": 8, "score_thr": 0.3}
# Generated images are 128 px: drawn at that size, mmdet's labels and lines are unreadable.
MIN_LONG_SIDE = 512
DPI_PER_PIXEL = 100 / 320


def visualization_settings(hparams: dict[str, Any]) -> tuple[int, float]:
    """`(num_images, score_thr)` from the hyperparameter `visualization` (defaults if absent)."""
    spec = hparams.get("visualization")
    if spec is None:
        spec = {}
    example = "e.g. {num_images: 8, score_thr: 0.3}"
    if not isinstance(spec, dict):
        raise ConfigError(f"hyperparameters.visualization is {spec!r}: use a mapping, {example}.")
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"hyperparameters.visualization.{unknown[0]} is not a setting; "
            f"known: {', '.join(DEFAULTS)} ({example})."
        )
    settings = {**DEFAULTS, **spec}
    num_images, score_thr = settings["num_images"], settings["score_thr"]
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 0:
        raise ConfigError(
            f"hyperparameters.visualization.num_images is {num_images!r}: use an int >= 0 "
            "(0 draws no images)."
        )
    if (
        not isinstance(score_thr, int | float)
        or isinstance(score_thr, bool)
        or not 0.0 <= score_thr <= 1.0
    ):
        raise ConfigError(
            f"hyperparameters.visualization.score_thr is {score_thr!r}: use a number from 0 to "
            "1 (predictions scoring above it are drawn)."
        )
    return num_images, float(score_thr)


def sample_indices(num_images: int, dataset_size: int) -> list[int]:
    """`num_images` indices spread evenly over the dataset, first and last included."""
    count = min(num_images, dataset_size)
    if count == 0:
        return []
    return [int(i) for i in np.linspace(0, dataset_size - 1, count).round()]


@functools.cache
def _visualizer() -> Any:
    # One per process: each builds a matplotlib figure (Agg canvas, no display needed).
    return VISUALIZERS.build(dict(type="DetLocalVisualizer", name="mmdet-determined", line_width=2))


def _scaled(instances: InstanceData, factor: int) -> InstanceData:
    """Instances with boxes and masks `factor` times larger (an integer, so masks stay exact)."""
    scaled = InstanceData(labels=instances.labels)
    if "scores" in instances:
        scaled.scores = instances.scores
    if "bboxes" in instances:
        bboxes = instances.bboxes
        scaled.bboxes = (bboxes.tensor if hasattr(bboxes, "tensor") else bboxes) * factor
    if "masks" in instances:
        masks = instances.masks
        if isinstance(masks, BitmapMasks | PolygonMasks):
            masks = masks.to_ndarray()
        masks = np.asarray(masks, dtype=bool)
        scaled.masks = masks.repeat(factor, axis=1).repeat(factor, axis=2)
    return scaled


def draw_sample(
    image: np.ndarray,
    sample: DetDataSample,
    dataset_meta: dict,
    score_thr: float,
    with_gt: bool = True,
) -> np.ndarray:
    """Draw a sample's predictions (and its ground truth on the left) with mmdet's visualizer.

    Args:
        image: the original image, RGB, HxWx3 uint8 (boxes and masks are in its coordinates).
        sample: a DetDataSample with `pred_instances` and, to draw them, `gt_instances`.
        dataset_meta: the dataset's `metainfo` (`classes`, `palette`).
        score_thr: predictions scoring above it are drawn.
        with_gt: draw the ground truth next to the predictions.

    Returns:
        The drawing, RGB uint8, upscaled to at least 512 px on the long side.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"draw_sample: the image must be RGB, HxWx3 uint8, not {image.dtype} {image.shape}."
        )
    sample = sample.cpu()
    factor = max(1, -(-MIN_LONG_SIDE // max(image.shape[:2])))
    shown = DetDataSample()
    if with_gt and "gt_instances" in sample and len(sample.gt_instances):
        shown.gt_instances = _scaled(sample.gt_instances, factor)
    invalid = 0
    if "pred_instances" in sample:
        predictions = sample.pred_instances[sample.pred_instances.scores > score_thr]
        if "bboxes" in predictions and len(predictions):
            # mmdet's visualizer asserts on inverted or non-finite boxes (an early or broken
            # model can predict them): leave them out, counted in the caption.
            boxes = predictions.bboxes
            valid = (
                torch.isfinite(boxes).all(dim=1)
                & (boxes[:, 0] <= boxes[:, 2])
                & (boxes[:, 1] <= boxes[:, 3])
            )
            invalid = int((~valid).sum())
            predictions = predictions[valid]
        if len(predictions):
            shown.pred_instances = _scaled(predictions, factor)
    visualizer = _visualizer()
    visualizer.dataset_meta = dataset_meta
    scaled = mmcv.imrescale(image, factor, interpolation="bilinear")
    # mmdet sizes labels and lines in points: a resolution that follows the image's size keeps
    # them legible on small and large images alike, and as large relative to it.
    visualizer.dpi = max(scaled.shape[:2]) * DPI_PER_PIXEL
    visualizer.fig_save.set_dpi(visualizer.dpi)
    # mmdet jitters mask colours with numpy's global generator: keep training's stream intact.
    state = np.random.get_state()
    try:
        visualizer.add_datasample(
            "sample", scaled, shown, draw_gt=with_gt, draw_pred=True, pred_score_thr=score_thr
        )
    finally:
        np.random.set_state(state)
    drawing = visualizer.get_image()
    caption = f"predictions, score > {score_thr:g}"
    if "pred_instances" not in shown:
        caption += ": none"
    if invalid:
        caption += f" ({invalid} invalid boxes not drawn)"
    return _with_captions(visualizer, drawing, scaled.shape[1] if with_gt else 0, caption)


def _with_captions(visualizer: Any, drawing: np.ndarray, split: int, caption: str) -> np.ndarray:
    """A caption band above the drawing; `split` > 0: where the predictions half starts."""
    band = max(24, drawing.shape[0] // 16)
    canvas = np.concatenate([np.full((band, *drawing.shape[1:]), 32, np.uint8), drawing])
    visualizer.set_image(canvas)
    captions = [caption]
    positions = [[split + band // 3, band / 2]]
    if split:
        captions.insert(0, "ground truth")
        positions.insert(0, [band // 3, band / 2])
        visualizer.draw_lines(
            np.array([split, split]),
            np.array([0, canvas.shape[0] - 1]),
            colors="white",
            line_widths=1,
        )
    visualizer.draw_texts(
        captions,
        np.array(positions),
        font_sizes=band * 0.45 * 72 / visualizer.dpi,
        colors="white",
        vertical_alignments="center",
    )
    return visualizer.get_image()


def load_image(dataset: Any, index: int) -> np.ndarray:
    """A dataset image as stored (RGB), read by the dataset's own loading step (file backend)."""
    loader = next(
        (t for t in dataset.pipeline.transforms if isinstance(t, LoadImageFromFile)),
        LoadImageFromFile(),
    )
    results = loader(dict(dataset.get_data_info(index)))
    return mmcv.bgr2rgb(results["img"])


def render_samples(
    detector: torch.nn.Module, dataset: Any, indices: list[int], score_thr: float
) -> dict[str, np.ndarray]:
    """Predict the dataset's images at `indices` and draw each next to its ground truth.

    Runs the detector in eval mode without gradients and restores its mode. Returns the
    drawings by image file name (without suffix).
    """
    start = time.monotonic()
    was_training = detector.training
    detector.eval()
    drawings: dict[str, np.ndarray] = {}
    try:
        for index in indices:
            data = detector.data_preprocessor(pseudo_collate([dataset[index]]), training=False)
            with torch.no_grad():
                (sample,) = detector(**data, mode="predict")
            name = Path(sample.img_path).stem
            if name in drawings:  # same file name in two folders
                name = f"{name}_{index}"
            drawings[name] = draw_sample(
                load_image(dataset, index), sample, dataset.metainfo, score_thr
            )
    finally:
        detector.train(was_training)
    logger.info(
        "Drew %d images with predictions in %.1f s.", len(drawings), time.monotonic() - start
    )
    return drawings


def save_pngs(drawings: dict[str, np.ndarray], folder: Path) -> list[Path]:
    """Write each drawing (RGB) as `folder/<name>.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, drawing in drawings.items():
        path = folder / f"{name}.png"
        mmcv.imwrite(mmcv.rgb2bgr(drawing), str(path))
        paths.append(path)
    return paths
