"""What batch inference writes into its output folder, from the per-image records
(`utils.inference.batching`):

    predictions.jsonl                        one record per image as it finishes: a rerun skips
                                             the images it holds (a line cut short is dropped)
    results.bbox.json, results.segm.json     COCO results, as predict writes them
    images.json                              the ids and files predicted, and those skipped, each
                                             with its reason
    images/                                  drawings of the first N images
    metrics.json, evaluation/                with an annotation file: evaluate's metrics, plots
                                             and report

A gs:// output is written into a local folder (`local_output`) and uploaded when the run ends or
is interrupted (`publish_output`); a rerun reads the records from the bucket and skips them.

The results files are written record by record: no prediction is held beyond the one being
written (the evaluation, when asked for, holds what COCO evaluation needs).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
from mmengine.config import Config

from utils.base.errors import PredictError
from utils.evaluation.plots import draw_report
from utils.evaluation.report import REPORT_DIR, evaluation_report, save_report
from utils.inference.batching import record_results, record_sample
from utils.inference.evaluate import METRICS_FILE
from utils.inference.predict import Detector, coco_evaluator
from utils.training.export import CONFIG_FILE, MODEL_FILE

RECORDS_FILE = "predictions.jsonl"


def read_export(export_dir: Path) -> Detector:
    """An export's config, classes and batches trained, without building its model (the driver
    of a pool of workers needs no model)."""
    try:  # mmap: the weights are not read
        saved = torch.load(
            export_dir / MODEL_FILE, map_location="cpu", weights_only=True, mmap=True
        )
        meta = saved["meta"]["dataset_meta"]
        classes = meta["classes"]
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise PredictError(
            f"{export_dir / MODEL_FILE} cannot be loaded ({detail}); re-export it."
        ) from err
    if not classes:
        raise PredictError(f"{export_dir / MODEL_FILE} has no dataset_meta classes; re-export it.")
    cfg = Config.fromfile(export_dir / CONFIG_FILE)
    return Detector(torch.nn.Identity(), cfg, meta, saved["meta"].get("iter"))


def local_output(output: str) -> Path:
    """The folder a run writes into: `output`, or for gs://BUCKET/PREFIX a new local folder
    holding the records an earlier run left there (a rerun skips those images)."""
    if "://" not in output:
        return Path(output)
    from utils.data.gcs_client import GCSNotFoundError, RetryPolicy, download_object

    bucket, prefix = bucket_and_prefix(output)
    local = Path(tempfile.mkdtemp(prefix="mmdet-predict-"))
    try:
        name = f"{prefix}/{RECORDS_FILE}".lstrip("/")
        download_object(bucket, name, local / RECORDS_FILE, RetryPolicy())
    except GCSNotFoundError:
        pass  # a first run
    return local


def publish_output(local: Path, output: str) -> int:
    """Upload every file of the local copy `local` under the gs:// `output` (nothing for a
    folder output); the number of files uploaded."""
    if "://" not in output:
        return 0
    from utils.data.gcs_client import upload_file

    bucket, prefix = bucket_and_prefix(output)
    files = sorted(path for path in local.rglob("*") if path.is_file())
    for path in files:
        upload_file(path, bucket, f"{prefix}/{path.relative_to(local).as_posix()}".lstrip("/"))
    return len(files)


def bucket_and_prefix(output: str) -> tuple[str, str]:
    """`gs://BUCKET/PREFIX` as its bucket and prefix (without slashes at its ends)."""
    bucket, _, prefix = output.removeprefix("gs://").partition("/")
    if not output.startswith("gs://") or not bucket:
        raise PredictError(f"--output {output}: give a folder or a gs://BUCKET/PREFIX.")
    return bucket, prefix.strip("/")


def finished_files(path: Path) -> set[str]:
    """The files a records file holds (predicted or skipped). A last line cut short by an
    interruption is removed; a bad line before the last is an error naming it."""
    if not path.is_file():
        return set()
    done, offset, size = set(), 0, path.stat().st_size
    with path.open("rb") as stream:
        for number, line in enumerate(stream, 1):
            try:
                done.add(json.loads(line)["file"])
            except (ValueError, KeyError, TypeError) as err:
                if offset + len(line) < size:
                    raise PredictError(
                        f"{path} line {number} is not a record ({err}): remove the line, or the "
                        "file to predict every image again."
                    ) from err
                break
            offset += len(line)
    if offset < size:
        with path.open("r+b") as stream:
            stream.truncate(offset)
    return done


def records(path: Path, files: set[str]) -> Iterator[dict[str, Any]]:
    """The records of the `files` (of this run's input), in the order they were written."""
    if not path.is_file():
        return
    with path.open() as stream:
        for line in stream:
            record = json.loads(line)
            if record["file"] in files:
                yield record


class JsonArray:
    """A JSON list written item by item."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.count = stream, 0
        stream.write("[")

    def extend(self, items: list[Any]) -> None:
        for item in items:
            self.stream.write((", " if self.count else "") + json.dumps(item))
            self.count += 1

    def close(self) -> None:
        self.stream.write("]")


def write_results(
    out_dir: Path, files: set[str], cat_ids: list[int], classes: list[str]
) -> dict[str, Any]:
    """Write the results files and images.json from the records of `files`; returns the
    counts: images, detections, skipped (file and reason), with_mask, written files."""
    source = out_dir / RECORDS_FILE
    paths = {task: out_dir / f"results.{task}.json" for task in ("bbox", "segm")}
    images, skipped, with_mask = [], [], False
    with paths["bbox"].open("w") as bbox_file, paths["segm"].open("w") as segm_file:
        bbox, segm = JsonArray(bbox_file), JsonArray(segm_file)
        for record in records(source, files):
            if "error" in record:
                skipped.append({"file_name": record["file"], "reason": record["error"]})
                continue
            images.append({"id": record["id"], "file_name": record["file"]})
            with_mask = with_mask or "masks" in record
            boxes, masks = record_results(record, cat_ids)
            bbox.extend(boxes)
            segm.extend(masks)
        bbox.close()
        segm.close()
    if not with_mask:  # a model without masks writes no segm results, as predict
        paths["segm"].unlink()
    images.sort(key=lambda image: image["id"])  # records come in any order; the index by id
    skipped.sort(key=lambda entry: entry["file_name"])
    index = {
        "images": images,
        "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, classes, strict=True)],
        "skipped": skipped,
    }
    (out_dir / "images.json").write_text(json.dumps(index))
    written = [paths["bbox"], *([paths["segm"]] if with_mask else []), out_dir / "images.json"]
    return {
        "images": len(images),
        "detections": bbox.count,
        "skipped": skipped,
        "with_mask": with_mask,
        "files": [str(p) for p in written],
    }


def evaluate_records(
    out_dir: Path,
    files: set[str],
    detector: Detector,
    ann_file: Path,
    with_mask: bool,
    score_thr: float,
) -> tuple[dict[str, float], dict[str, Any] | None, list[Path]]:
    """The predicted images' COCO metrics, as evaluate computes them (the config's CocoMetric,
    the same engine), the evaluation report and its plots; returns (metrics, report, files)."""
    evaluator = coco_evaluator(detector.cfg, ann_file, with_mask, detector.dataset_meta)
    for record in records(out_dir / RECORDS_FILE, files):
        if "error" not in record:
            evaluator.update([record_sample(record)])
    if not evaluator.entries:
        return {}, None, []
    metrics = evaluator.compute([evaluator.entries])
    metric = evaluator.coco_metric()
    report = evaluation_report(metric, score_thr) if metric is not None else None
    written = []
    if report is not None:
        written = save_report(report, draw_report(report), out_dir / REPORT_DIR)
    return metrics, report, written


def write_metrics(out_dir: Path, record: dict[str, Any]) -> Path:
    """metrics.json, as evaluate writes it (split, annotation file, model, metrics, ...)."""
    path = out_dir / METRICS_FILE
    path.write_text(json.dumps(record, indent=1))
    return path
