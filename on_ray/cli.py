"""`python -m on_ray`'s command line: `train` (Ray Train), `tune` (Ray Tune), `serve` (Ray
Serve), and `export`, `predict`, `evaluate` as model_def.py runs them (utils/inference/commands.py),
on Ray's checkpoint folders. Nothing here needs Determined."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

from on_ray import batch_predict
from on_ray.checkpoints import CHECKPOINTS
from on_ray.serve_cli import arguments as serve_arguments
from on_ray.serve_cli import serve
from utils.base.versions import check_versions
from utils.inference.commands import (
    COMMANDS,
    add_commands,
    positive_int,
    run_command,
)

USAGE = """\
One run of an experiment on Ray Train (a local Ray, or a cluster's with --address):
    python -m on_ray train EXPERIMENT.yaml [--workers N] [--set KEY=VALUE] [--output DIR]
A hyperparameter search of the experiment on Ray Tune:
    python -m on_ray tune EXPERIMENT.yaml [--search-alg random|hyperopt|optuna] [--set ...]
A checkpoint behind a batched HTTP API and a web page, on Ray Serve:
    python -m on_ray serve CHECKPOINT [--replicas N | --autoscale MIN,MAX] [--port 8000]
A checkpoint's export, batch inference and evaluation, as with model_def.py (CHECKPOINT: a Ray
checkpoint folder, <storage>/<run>/checkpoint_*, or any folder model_def.py takes):
    python -m on_ray export CHECKPOINT --out DIR
    python -m on_ray predict CHECKPOINT INPUT... --out DIR
    python -m on_ray evaluate CHECKPOINT ANNOTATION_FILE [--image-root DIR] [--out DIR]
Batch inference on Ray Data, a pool of workers with one model each (docs/batch-inference.md):
    python -m on_ray predict CHECKPOINT INPUT --workers N [--annotations ANN.json] [--output DIR]
"""


def common_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    parser.add_argument("experiment", help="experiment YAML (as for Determined)")
    parser.add_argument(
        "--address", help="a running Ray cluster (`auto`, or HOST:PORT); default: a local Ray"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted key"
    )
    parser.add_argument(
        "--output", default=output, help=f"metrics.jsonl and TensorBoard files (default {output})"
    )
    parser.add_argument(
        "--storage",
        help="Ray's storage_path for checkpoints: a folder or a cloud URI (default OUTPUT/ray)",
    )
    parser.add_argument("--max-batches", type=positive_int, help="cap the training length")
    parser.add_argument(
        "--report-every", type=positive_int, default=20, help="batches per training report"
    )


def build_parser() -> argparse.ArgumentParser:
    """Every command's arguments; `export`, `predict` and `evaluate` take model_def.py's."""
    parser = argparse.ArgumentParser(
        prog="python -m on_ray", description=USAGE, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="one run on Ray Train's TorchTrainer")
    common_arguments(train, "runs/ray")
    train.add_argument(
        "--workers", type=positive_int, help="workers (default resources.slots_per_trial)"
    )
    train.add_argument("--resume", help="a checkpoint folder of an earlier run to continue")
    tune = commands.add_parser("tune", help="the experiment's searcher on Ray Tune")
    common_arguments(tune, "runs/tune")
    tune.add_argument(
        "--search-alg",
        default="random",
        choices=("random", "hyperopt", "optuna"),
        help="who picks the points: random draws (Determined's), or HyperOpt's / Optuna's TPE",
    )
    tune.add_argument("--seed", type=int, default=0, help="the search algorithm's seed")
    serve_arguments(commands.add_parser("serve", help="a checkpoint on Ray Serve"))
    add_commands(commands)
    commands.choices["predict"].epilog = batch_predict.HELP
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Run a command; returns Ray's result (train), result grid (tune), or what `export`,
    `predict` and `evaluate` return."""
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    check_versions("ray")  # the shared stack and Ray's packages; Determined is not needed
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["predict"] and batch_predict.on_ray_data(argv[1:]):
        return batch_predict.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command in COMMANDS:
        return run_command(args, CHECKPOINTS)
    if args.command == "serve":
        return serve(args)
    common = dict(
        address=args.address,
        output=args.output,
        storage=args.storage,
        max_batches=args.max_batches,
        report_every=args.report_every,
    )
    if args.command == "train":
        from on_ray.train import train

        return train(args.experiment, args.set, workers=args.workers, resume=args.resume, **common)
    from on_ray.tune import tune_search

    return tune_search(
        args.experiment, args.set, search_alg=args.search_alg, seed=args.seed, **common
    )
