"""`model_def.py`'s command line: train locally or on a cluster, check an experiment, or run a
command on a checkpoint (`export`, `predict`, `evaluate`: utils/inference/commands.py, with
Determined's checkpoints)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import determined as det
from determined import pytorch

from on_determined.commands import CHECKPOINTS
from on_determined.context import DETERMINED_RULES
from on_determined.local import run_local
from on_determined.trial import MMDetTrial
from utils.check.experiment import check_experiment
from utils.config.build import accumulative_counts
from utils.experiment import load as experiment
from utils.inference.commands import COMMANDS, add_commands, positive_int, run_command

USAGE = """\
On a cluster the experiment's entrypoint runs model_def.py:
    python3 -m determined.launch.torch_distributed python3 model_def.py
Locally, without a cluster, through the same Determined Trainer:
    python model_def.py EXPERIMENT.yaml --local [--max-batches N] [--set KEY=VALUE] [--output DIR]
Check an experiment before submitting it:
    python model_def.py EXPERIMENT.yaml --check
A checkpoint's detector for MMDetection's tools, and batch inference with it:
    python model_def.py export CHECKPOINT --out DIR
    python model_def.py predict CHECKPOINT INPUT... --out DIR
Evaluate a checkpoint on a test split (metrics, plots; into its MLflow run where configured):
    python model_def.py evaluate CHECKPOINT ANNOTATION_FILE [--image-root DIR] [--out DIR]
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="model_def.py", description=USAGE, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("experiment", nargs="?", help="experiment YAML (local runs)")
    parser.add_argument("--local", action="store_true", help="train here, without a cluster")
    parser.add_argument(
        "--check", action="store_true", help="check the experiment before submitting it, then exit"
    )
    parser.add_argument(
        "--max-batches", type=positive_int, help="cap the training length (local), >= 1"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key of the experiment YAML, e.g. data.backend=synthetic",
    )
    parser.add_argument("--output", default="runs/local", help="folder for checkpoints and metrics")
    parser.add_argument("--resume", help="checkpoint folder of an earlier local run to continue")
    parser.add_argument(
        "--report-every", type=positive_int, default=20, help="batches per training report"
    )
    args = parser.parse_args(argv)
    if (args.local or args.check) and not args.experiment:
        parser.error("--local and --check need an experiment YAML")
    return args


def run_check(experiment_file: str, overrides: list[str]) -> int:
    """Print what the experiment would train, or its problems; returns the exit status."""
    exp_conf = experiment.load_experiment(experiment_file, overrides)
    summary, problems = check_experiment(exp_conf, DETERMINED_RULES)
    print(f"{experiment_file}: {exp_conf.get('name', '')}")
    for line in summary:
        print(f"  {line}")
    if problems:
        print(f"{len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"OK: ready to submit with `det experiment create {experiment_file} .`")
    return 0


def run_on_cluster() -> None:
    info = det.get_cluster_info()
    frequency = accumulative_counts(info.trial.hparams) if info else 1
    with det.pytorch.init(aggregation_frequency=frequency) as context:
        trial = MMDetTrial(context)
        period = pytorch.Batch(trial.session.schedule.validation_period)
        det.pytorch.Trainer(trial, context).fit(
            max_length=pytorch.Batch(trial.max_batches),
            validation_period=period,
            checkpoint_period=period,
            latest_checkpoint=info.latest_checkpoint if info else None,
        )


def command_parser() -> argparse.ArgumentParser:
    """`export`, `predict` and `evaluate`: the arguments `python -m on_ray` takes too."""
    parser = argparse.ArgumentParser(prog="model_def.py")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Train (locally or on a cluster), check an experiment, or run a command; returns what
    `export` (the folder), `predict` (its summary) and `evaluate` (its result) return."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    if argv[:1] and argv[0] in COMMANDS:
        return run_command(command_parser().parse_args(argv), CHECKPOINTS)
    args = parse_args(argv)
    # Errors in what the command line names (the experiment file, --set, --resume, the
    # experiment's keys) end the command with their one-line message; errors of the run itself
    # propagate, and the script entry (model_def.py) prints them as one line.
    try:
        if args.check:
            sys.exit(run_check(args.experiment, args.set))
        if args.local:
            return run_local(
                args.experiment,
                args.set,
                args.output,
                max_batches=args.max_batches,
                resume=args.resume,
                report_every=args.report_every,
            )
    except experiment.ExperimentError as err:
        raise SystemExit(str(err)) from err
    if det.get_cluster_info() is None:
        raise SystemExit("Not on a Determined cluster: pass an experiment YAML and --local.")
    run_on_cluster()
    return None
