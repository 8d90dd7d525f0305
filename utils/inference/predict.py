"""Batch inference with an exported detector (`model.pth` + `config.py`, see
utils/training/export.py).

Images go through the config's test pipeline (without its ground-truth loading) and the model's
data preprocessor, a batch at a time, as in the trial's validation. Writes COCO results files
(`results.bbox.json`, `results.segm.json` for models with masks), `images.json` (the ids the
results use, with their files, COCO-style) and rendered images in `images/`. Given a COCO
annotation file, evaluates the predictions with the trial's evaluator (mmdet's CocoMetric).
An image that does not decode stops the run, naming it; `skip_bad_images` skips such images
instead, and the summary and `images.json` list them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mmcv
import numpy as np
import torch
from mmcv.transforms import Compose
from mmdet.registry import MODELS, TRANSFORMS
from mmdet.utils import get_test_pipeline_cfg, register_all_modules
from mmengine.config import Config, ConfigDict
from mmengine.dataset import pseudo_collate
from tqdm import tqdm

from utils.config.tree import evaluator_configs
from utils.evaluation.coco_metric import encode_masks
from utils.evaluation.drawings import draw_sample
from utils.evaluation.evaluator import CocoEvaluator
from utils.inference.inputs import Inputs, PredictError, category_ids
from utils.training.export import CONFIG_FILE, EXPORT_DIR, MODEL_FILE


@dataclass
class Detector:
    """A loaded export: the model (in eval mode, on its device), its config, its classes."""

    model: torch.nn.Module
    cfg: Config
    dataset_meta: dict[str, Any]
    batches: int | None = None  # trained (mmengine's meta.iter)

    def validation_batch(self) -> int:
        """The config's validation batch size: predicting in batches of it pads each batch as
        validation did, so the predictions, and the metrics, are the same."""
        for loader in ("val_dataloader", "test_dataloader"):
            if self.cfg.get(loader) and self.cfg[loader].get("batch_size"):
                return int(self.cfg[loader].batch_size)
        return 1


def find_export(checkpoint: str | Path) -> Path:
    """The export folder: `CHECKPOINT/mmdet/` of a Determined checkpoint, or CHECKPOINT itself."""
    path = Path(checkpoint)
    if not path.exists():
        raise PredictError(
            f"Checkpoint {path} does not exist: pass a checkpoint folder (a Determined checkpoint "
            f"or an export with {MODEL_FILE} and {CONFIG_FILE}) or a Determined checkpoint UUID."
        )
    for folder in (path / EXPORT_DIR, path):
        if (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file():
            return folder
    if (path / "state_dict.pth").is_file():
        raise PredictError(
            f"{path} is a Determined checkpoint without an mmdet export ({EXPORT_DIR}/): write "
            f"one with `python model_def.py export {path} --out DIR`, then predict with DIR."
        )
    raise PredictError(
        f"{path} holds neither {EXPORT_DIR}/{MODEL_FILE} nor {MODEL_FILE} and {CONFIG_FILE}: "
        "pass a checkpoint folder written by this project's trials or export command."
    )


def load_detector(export_dir: Path, device: str) -> Detector:
    """Build the config's model and load `model.pth` into it (strictly: every tensor must fit)."""
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(export_dir / CONFIG_FILE)
    model_file = export_dir / MODEL_FILE
    try:
        checkpoint = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        reason = str(err).splitlines()[0][:200]  # torch's first line says what failed
        raise PredictError(f"{model_file} cannot be loaded ({reason}); re-export it.") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise PredictError(f"{model_file} holds no state_dict: not an mmdet checkpoint.")
    meta = (checkpoint.get("meta") or {}).get("dataset_meta")
    if not meta or not meta.get("classes"):
        raise PredictError(f"{model_file} has no meta.dataset_meta.classes; re-export it.")
    model = MODELS.build(cfg.model)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise PredictError(
            f"{model_file} does not fit the model of {export_dir / CONFIG_FILE}: {err}"
        ) from err
    model.dataset_meta = meta
    batches = checkpoint["meta"].get("iter")
    return Detector(model.to(device).eval(), cfg, meta, batches)


# What to do about an image that does not decode, by default (predict's options).
BAD_IMAGE_HINT = (
    "remove it, or pass --skip-bad-images to skip such files (they are counted and listed)"
)


def batches(
    inputs: Inputs,
    cfg: Config,
    batch_size: int,
    skip_bad: bool,
    bad: list[Path],
    bad_hint: str = BAD_IMAGE_HINT,
) -> Iterator[tuple[list[np.ndarray], dict[str, list]]]:
    """(original RGB images, collated pipeline outputs) a batch at a time."""
    steps = [s for s in get_test_pipeline_cfg(cfg) if "LoadAnnotations" not in str(s["type"])]
    load, rest = TRANSFORMS.build(steps[0]), Compose(steps[1:])
    originals, items = [], []
    for image_id, path in inputs.images:
        try:
            results = load({"img_path": str(path), "img_id": image_id})
        except Exception as err:  # decoders raise many types; all mean "not an image"
            if not skip_bad:
                raise PredictError(
                    f"{path} cannot be decoded as an image ({err}): {bad_hint}."
                ) from err
            bad.append(path)
            continue
        originals.append(mmcv.bgr2rgb(results["img"]))
        items.append(rest(results))
        if len(items) == batch_size:
            yield originals, pseudo_collate(items)
            originals, items = [], []
    if items:
        yield originals, pseudo_collate(items)


def coco_results(sample: Any, cat_ids: list[int]) -> tuple[list[dict], list[dict]]:
    """One image's predictions as COCO bbox and segm results."""
    pred = sample.pred_instances  # values leave the device as lists; masks encoded there first
    image_id = int(sample.img_id)
    labels = pred.labels.tolist()
    scores = pred.scores.tolist()
    boxes = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in pred.bboxes.tolist()]
    bbox = [
        {"image_id": image_id, "category_id": cat_ids[label], "bbox": box, "score": score}
        for label, box, score in zip(labels, boxes, scores, strict=True)
    ]
    segm = []
    if "masks" in pred:
        mask_scores = pred.mask_scores.tolist() if "mask_scores" in pred else scores
        for label, rle, score in zip(
            labels, encode_masks(pred.masks.detach(), pred.bboxes), mask_scores, strict=True
        ):
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
            segm.append(
                {"image_id": image_id, "category_id": cat_ids[label], "segmentation": segmentation,
                 "score": score}
            )  # fmt: skip
    return bbox, segm


def coco_evaluator(cfg: Config, ann_file: Path, with_mask: bool, meta: dict) -> CocoEvaluator:
    """The config's CocoMetric settings (as the trial validates) on `ann_file`."""
    metrics = evaluator_configs(cfg.get("val_evaluator"))
    coco = [m for m in metrics if m.get("type") in ("CocoMetric", "mmdet.CocoMetric")]
    metric = ConfigDict(coco[0]) if coco else ConfigDict(type="CocoMetric")
    metric.update(ann_file=str(ann_file), metric=["bbox", "segm"] if with_mask else "bbox")
    metric.update(format_only=False, outfile_prefix=None)
    evaluator = CocoEvaluator(Config({"val_evaluator": metric}), meta=meta)
    return evaluator


def predict(
    export_dir: Path,
    inputs: Inputs,
    out_dir: Path,
    batch_size: int | None = None,
    score_thr: float = 0.3,
    device: str | None = None,
    skip_bad_images: bool = False,
    max_rendered: int | None = None,
) -> dict[str, Any]:
    """Predict every input image; write results, `images.json` and rendered images.

    Args:
        export_dir: folder with `model.pth` and `config.py` (see `find_export`).
        inputs: images from `collect_inputs`.
        out_dir: output folder (created).
        batch_size: images per forward pass; by default the config's validation batch, with
            which the metrics equal validation's (mmdet pads each batch to its largest image).
        score_thr: predictions above it are drawn; results files keep every prediction the
            model's test_cfg keeps, as COCO evaluation expects.
        device: e.g. "cuda:0" or "cpu"; CUDA when available by default.
        skip_bad_images: skip images that do not decode (counted and listed) instead of failing.
        max_rendered: draw the first this many images only (drawing takes about as long as a
            CPU forward pass); all by default.

    Returns:
        A summary: images predicted, detections, skipped images, written files, COCO metrics,
        the batch size and the batches the model trained.
    """
    return run_predictions(
        export_dir, inputs, out_dir, batch_size, score_thr, device, skip_bad_images, max_rendered
    )[0]


def run_predictions(
    export_dir: Path,
    inputs: Inputs,
    out_dir: Path,
    batch_size: int | None = None,
    score_thr: float = 0.3,
    device: str | None = None,
    skip_bad_images: bool = False,
    max_rendered: int | None = None,
    bad_hint: str = BAD_IMAGE_HINT,
) -> tuple[dict[str, Any], CocoEvaluator | None]:
    """`predict`, also returning its evaluator (None without an annotation file), whose COCO
    metric keeps its last evaluation for the plots; `bad_hint`: what to do about an image that
    does not decode."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    detector = load_detector(export_dir, device)
    batch_size = batch_size or detector.validation_batch()
    classes = tuple(detector.dataset_meta["classes"])
    cat_ids = category_ids(inputs, classes, export_dir)
    with_mask = bool(getattr(detector.model, "with_mask", False))
    evaluator = None
    if inputs.ann_file is not None:
        evaluator = coco_evaluator(detector.cfg, inputs.ann_file, with_mask, detector.dataset_meta)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    paths = dict(inputs.images)
    bbox_results: list[dict] = []
    segm_results: list[dict] = []
    skipped: list[Path] = []
    rendered = 0
    bar = tqdm(total=len(inputs.images), unit="img", desc="predict")
    loaded = batches(inputs, detector.cfg, batch_size, skip_bad_images, skipped, bad_hint)
    for originals, batch in loaded:
        with torch.no_grad():
            samples = detector.model.test_step(batch)
        for image, sample in zip(originals, samples, strict=True):
            bbox, segm = coco_results(sample, cat_ids)
            bbox_results += bbox
            segm_results += segm
            if max_rendered is None or rendered < max_rendered:
                drawing = draw_sample(image, sample, detector.dataset_meta, score_thr, False)
                name = f"{sample.img_id}_{paths[sample.img_id].stem}.png"
                mmcv.imwrite(mmcv.rgb2bgr(drawing), str(out_dir / "images" / name))
                rendered += 1
        if evaluator is not None:
            evaluator.update(samples)
        bar.update(len(samples))
    bar.close()

    written = [write_json(out_dir / "results.bbox.json", bbox_results)]
    if with_mask:
        written.append(write_json(out_dir / "results.segm.json", segm_results))
    bad = set(skipped)
    done = [(i, p) for i, p in inputs.images if p not in bad]
    index = {
        "images": [{"id": i, "file_name": str(p)} for i, p in done],
        "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, classes, strict=True)],
        "skipped": [str(p) for p in skipped],
    }
    written.append(write_json(out_dir / "images.json", index))
    summary = {
        "images": len(done),
        "detections": len(bbox_results),
        "skipped": [str(p) for p in skipped],
        "files": [str(p) for p in written],
        "metrics": evaluator.compute([evaluator.entries]) if evaluator and done else {},
        "batch_size": batch_size,
        "batches": detector.batches,
    }
    return summary, evaluator


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path
