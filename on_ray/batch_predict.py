"""`python -m on_ray predict ... --workers N`: batch inference on Ray Data.

The images stream through `map_batches` over a pool of actors, each holding the model once (a GPU
each where the cluster has them): `utils.inference.batching.ImagePredictor`. The driver writes
each image's record to `predictions.jsonl` as it comes back (a rerun skips what it holds), the
drawings of the first N images, then the COCO results, and with an annotation file the metrics,
report and plots that `evaluate` writes (and logs them to MLflow when configured).

Everything the command line names is checked before any worker starts: the checkpoint, the
input, `--address`, and the workers against what the cluster has.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from utils.base.errors import USER_ERRORS, ExperimentError, PredictError
from utils.inference.commands import CHECKPOINT_HELP, IMAGE_ROOT_HELP, positive_int

# Any of these after `predict` runs it on Ray Data; without them, predict runs in this process.
RAY_OPTIONS = ("--workers", "--autoscale", "--address")
# What a worker needs of the driver's environment: Cloud Storage's endpoint and credentials.
STORAGE_VARIABLES = ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")
STORAGE_VARIABLES += ("GOOGLE_APPLICATION_CREDENTIALS",)
SHOWN = 20  # skipped images printed; images.json lists all
HELP = (
    "On Ray Data, over a pool of workers (one model each): give --workers N, --autoscale MIN,MAX "
    "or --address; `python -m on_ray predict --workers 1 --help` lists its options. Without "
    "them, predict runs in this process, as model_def.py's."
)
logger = logging.getLogger(__name__)


def on_ray_data(argv: list[str]) -> bool:
    """Whether `predict`'s arguments ask for Ray Data."""
    return any(arg.split("=")[0] in RAY_OPTIONS for arg in argv)


def build_parser() -> argparse.ArgumentParser:
    from on_ray.serve_cli import replica_range

    parser = argparse.ArgumentParser(
        prog="python -m on_ray predict",
        description="Batch inference with a checkpoint on Ray Data, as many workers as asked.",
    )
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument(
        "input",
        help="a folder of images (recursively), an image, a text file of image paths (one a "
        "line), a COCO annotation file, or a gs://BUCKET/PREFIX",
    )
    scaling = parser.add_mutually_exclusive_group()
    scaling.add_argument("--workers", type=positive_int, help="actors, one model each (1)")
    scaling.add_argument(
        "--autoscale", type=replica_range, metavar="MIN,MAX", help="actors scaled with the load"
    )
    parser.add_argument(
        "--address", help="a running Ray cluster (`auto`, or HOST:PORT); default: a local Ray"
    )
    parser.add_argument(
        "--worker-cpus",
        type=positive_int,
        help="CPUs (torch threads) each worker takes on a cluster without GPUs (default: an equal "
        "share of the cluster's)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, help="images per call (default: the config's val batch)"
    )
    parser.add_argument(
        "--score-thr", type=float, default=0.3, help="draw, and count in the confusion matrix, "
        "the detections above it (0.3)",
    )  # fmt: skip
    parser.add_argument(
        "--output",
        "--out",
        default="runs/predict",
        help="output folder or gs://BUCKET/PREFIX (runs/predict)",
    )
    parser.add_argument(
        "--annotations",
        help="COCO annotation file: predict its images (INPUT: the folder or gs:// prefix of "
        "their file_names) and evaluate them as `evaluate` does",
    )
    parser.add_argument("--image-root", help=IMAGE_ROOT_HELP)
    parser.add_argument("--draw", type=int, default=8, metavar="N", help="draw N images (8)")
    parser.add_argument("--split-name", default="test", help="MLflow's `<name>/` (test)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return parser


def main(argv: list[str]) -> dict[str, Any]:
    """Parse and run; an error in what the command line names ends it in one line."""
    args = build_parser().parse_args(argv)
    try:
        return batch_predict(args)
    except USER_ERRORS as err:
        raise SystemExit(f"predict: {err}") from err


def batch_predict(args: argparse.Namespace) -> dict[str, Any]:
    """Predict every image of `args.input` not predicted before into `args.output`."""
    from on_ray import cluster
    from on_ray.checkpoints import CHECKPOINTS
    from utils.inference import batch_outputs as outputs
    from utils.inference.batch_inputs import batch_inputs
    from utils.inference.inputs import category_ids
    from utils.inference.predict import find_export

    if not 0 <= args.score_thr <= 1:
        raise PredictError(f"--score-thr {args.score_thr}: use a number from 0 to 1.")
    workers = args.autoscale or (args.workers or 1,) * 2
    if workers[0] < 1:
        raise PredictError(f"--autoscale {args.autoscale}: Ray Data keeps at least 1 worker.")
    checkpoint = CHECKPOINTS.locate(args.checkpoint)
    export_dir = find_export(checkpoint)
    detector = outputs.read_export(export_dir)
    inputs = batch_inputs(args.input, args.annotations, args.image_root)
    classes = list(detector.dataset_meta["classes"])
    cat_ids = category_ids(inputs, tuple(classes), export_dir)
    batch_size = args.batch_size or detector.validation_batch()
    out = outputs.local_output(args.output)  # a gs:// output: a local copy, uploaded at the end
    try:
        done = outputs.finished_files(out / outputs.RECORDS_FILE)
        todo = [(i, path) for i, path in inputs.images if path not in done]
        cluster.connect(args.address)
        use_gpu = cluster.check_workers(workers[1], "--workers (or --autoscale's MAX)")
        cpus = None if use_gpu else worker_cpus(args.worker_cpus, workers[1])
        (out / "images").mkdir(parents=True, exist_ok=True)
        if done:
            before = len(inputs.images) - len(todo)
            print(f"{before} of {len(inputs.images)} images done before (in {args.output}): "
                  f"predicting the other {len(todo)}.")  # fmt: skip
        if todo:
            draw = frozenset(i for i, _ in inputs.images[: max(args.draw, 0)])
            predict_on_ray(export_dir, todo, out, batch_size, workers, cpus, draw, args.score_thr)
        files = {path for _, path in inputs.images}
        summary = outputs.write_results(out, files, cat_ids, classes)
        summary.update(batch_size=batch_size, predicted=len(todo), metrics={}, report=None)
        print(f"Predicted {summary['images']} images on Ray Data in batches of {batch_size} "
              f"({len(todo)} in this run): {summary['detections']} detections.")  # fmt: skip
        if summary["skipped"]:
            skipped = summary["skipped"]
            print(f"Skipped {len(skipped)} images (images.json lists each with its reason):")
            for entry in skipped[:SHOWN]:
                print(f"  {entry['file_name']}: {entry['reason']}")
            if len(skipped) > SHOWN:
                print(f"  ... and {len(skipped) - SHOWN} more")
        if inputs.ann_file is not None:
            evaluate(args, out, files, detector, inputs.ann_file, summary, Path(checkpoint))
        extra = ", metrics.json, evaluation/ plots and report.json" if summary["metrics"] else ""
        print(f"Wrote {out}/: {outputs.RECORDS_FILE}, results, images.json{extra}, images/.")
        return summary
    finally:  # also what an interrupted run finished: a rerun skips it
        if outputs.publish_output(out, args.output):
            print(f"Uploaded {out}/ to {args.output}.")


def worker_cpus(asked: int | None, count: int) -> int:
    """The CPUs (torch threads) each of `count` workers takes on a cluster of CPUs: `asked`,
    else an equal share of the cluster's (Ray's default of one would cap torch at one thread)."""
    import ray

    from on_ray import cluster

    have = int(ray.cluster_resources().get("CPU", 0))
    if asked is None:
        return int(cluster.worker_resources(count, False)["CPU"])
    if asked * count > have:
        raise ExperimentError(
            f"--worker-cpus {asked} for {count} workers is {asked * count} CPUs, but Ray sees "
            f"{have} in the cluster: ask for fewer, or leave --worker-cpus out (an equal share)."
        )
    return asked


def predict_on_ray(
    export_dir: Path,
    todo: list[tuple[int, str]],
    out: Path,
    batch_size: int,
    workers: tuple[int, int],
    cpus: int | None,
    draw: frozenset[int],
    score_thr: float,
) -> None:
    """Stream the images through the actors, each with `cpus` CPUs (None: a GPU); write each
    record (and drawing) as it comes."""
    import ray.data
    from tqdm import tqdm

    from on_ray import cluster
    from utils.inference.batch_outputs import RECORDS_FILE
    from utils.inference.batching import ImagePredictor, drawing_name

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below shows images/s and the time left
    context.execution_options.verbose_progress = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    low, high = workers
    env = {
        **cluster.worker_env(),
        **{k: os.environ[k] for k in STORAGE_VARIABLES if k in os.environ},
    }
    items = [{"id": image_id, "path": path} for image_id, path in todo]
    # Small blocks (a batch each, up to 1000 blocks): an actor gets work as soon as it is free,
    # and the records come back block by block.
    blocks = max(1, min(len(items) // batch_size, 1000))
    pool = ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ImagePredictor,
        fn_constructor_kwargs={
            "export_dir": str(export_dir),
            "device": "cpu" if cpus else "cuda",
            "draw_ids": draw,
            "score_thr": score_thr,
            "threads": cpus,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=pool,
        num_cpus=cpus or 1,
        num_gpus=0 if cpus else 1,
        runtime_env={"env_vars": env} if env else None,
        udf_modifying_row_count=False,
    )
    names = dict(todo)
    bar = tqdm(total=len(todo), unit="img", desc="predict", file=sys.stdout)
    ledger = (out / RECORDS_FILE).open("a")
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows = zip(batch["id"], batch["record"], batch["png"], strict=True)
            for image_id, record, png in rows:
                if png:  # written before its record: a record means its drawing is there
                    name = drawing_name(int(image_id), names[int(image_id)])
                    (out / "images" / name).write_bytes(png)
                ledger.write(record + "\n")
            ledger.flush()  # a batch's records survive an interruption
            bar.update(len(batch["id"]))
    except KeyboardInterrupt:
        raise SystemExit(
            f"Interrupted after {bar.n} of {len(todo)} images: the same command predicts the "
            f"rest (the others are in {out / RECORDS_FILE})."
        ) from None
    finally:
        ledger.close()
        bar.close()


def evaluate(
    args: argparse.Namespace,
    out: Path,
    files: set[str],
    detector: Any,
    ann_file: Path,
    summary: dict[str, Any],
    checkpoint: Path,
) -> None:
    """evaluate's table, report, metrics.json and MLflow run for the predicted images."""
    from on_ray.checkpoints import CHECKPOINTS
    from utils.evaluation.report import coco_table, report_lines
    from utils.inference import batch_outputs as outputs
    from utils.inference.evaluate import log_evaluation
    from utils.inference.predict import find_export

    metrics, report, written = outputs.evaluate_records(
        out, files, detector, ann_file, summary["with_mask"], args.score_thr
    )
    if not metrics:
        print(f"No image of {ann_file} was predicted: nothing to evaluate.")
        return
    record = {
        "split": args.split_name,
        "annotation_file": str(ann_file.resolve()),
        "model": str(find_export(checkpoint).resolve()),
        "batches": detector.batches,
        "batch_size": summary["batch_size"],
        "images": summary["images"],
        "metrics": metrics,
    }
    summary["files"] += [str(p) for p in written] + [str(outputs.write_metrics(out, record))]
    summary.update(metrics=metrics, report=report)
    print(f"Evaluated {summary['images']} images of {ann_file} ({args.split_name}) in batches of "
          f"{summary['batch_size']}, model trained {detector.batches} batches:")  # fmt: skip
    print("\n".join(coco_table(metrics)))
    if report is not None:
        print("\n".join(report_lines(report)))
    settings, run_id = (None, None)
    if not args.no_mlflow:
        settings, run_id = CHECKPOINTS.tracking(checkpoint, dict(os.environ))
    if settings is not None:
        result = {"metrics": metrics, "batches": detector.batches}
        summary["mlflow_run_id"] = log_evaluation(
            settings, run_id, args.split_name, result, out, args.checkpoint
        )
        print(f"MLflow run {summary['mlflow_run_id']}: {args.split_name}/ metrics and files.")
