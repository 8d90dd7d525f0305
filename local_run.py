"""Local runs of a trial through Determined's Trainer: one process, or one per slot (torchrun).

Determined's local mode leaves a few things to the caller, done here: where checkpoints and
TensorBoard files go, starting the process group, skipping the batches a resumed run already
trained, and reporting progress and metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import determined as det
import torch
from determined import pytorch

from utils import experiment
from utils.config import accumulative_counts


class LocalReport(pytorch.PyTorchCallback):
    """Local runs: progress on the console and every reported step in `metrics.jsonl`."""

    def __init__(self, path: Path, total: int) -> None:
        self.path = path
        self.total = total
        self.start = time.monotonic()
        self.first_batch: int | None = None
        self.batches = 0

    def _write(self, kind: str, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as stream:
            record = {"kind": kind, "batches": self.batches, "metrics": metrics}
            stream.write(json.dumps(record) + "\n")

    def on_training_workload_end(
        self, avg_metrics: dict[str, Any], batch_metrics: dict[str, Any]
    ) -> None:
        # Determined adds the trial's batch count to training metrics; validations follow a
        # training workload, so they happen at the same count.
        self.batches = batches = int(avg_metrics["batches"])
        self._write("training", avg_metrics)
        if self.first_batch is None:
            self.first_batch, self.start = batches, time.monotonic()
            left = "?"
        else:
            rate = (time.monotonic() - self.start) / (batches - self.first_batch)
            left = f"{rate * (self.total - batches) / 60:.1f} min"
        print(
            f"[{batches}/{self.total}] loss {avg_metrics['loss']:.4f} "
            f"lr {avg_metrics['lr']:.3g} time left {left}",
            flush=True,
        )

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self._write("validation", metrics)


def local_distributed() -> det.core.DistributedContext | None:
    """Under `torchrun`, the process group and Determined's distributed context; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # Determined 0.38's local mode neither starts the process group nor picks torch for it.
    os.environ["USE_TORCH_DISTRIBUTED"] = "1"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # Determined's own IPC listens on fixed ports by default: two local runs on one host would
    # talk to each other's chief. The chief picks free ones and tells the other ranks.
    ports = free_ports(2) if torch.distributed.get_rank() == 0 else [0, 0]
    torch.distributed.broadcast_object_list(ports, src=0)
    env = os.environ
    return det.core.DistributedContext(
        rank=int(env["RANK"]),
        size=int(env["WORLD_SIZE"]),
        local_rank=int(env["LOCAL_RANK"]),
        local_size=int(env["LOCAL_WORLD_SIZE"]),
        cross_rank=int(env["GROUP_RANK"]),
        cross_size=int(env["GROUP_WORLD_SIZE"]),
        chief_ip=env.get("MASTER_ADDR"),
        pub_port=ports[0],
        pull_port=ports[1],
    )


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports free on this host now (the OS picks them)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]


def run_local(args: argparse.Namespace, trial_class: type[pytorch.PyTorchTrial]) -> Path:
    """Train on this machine with Determined's Trainer; returns the path of `metrics.jsonl`.

    One process, or one per slot under `torchrun --nproc_per_node=N model_def.py ... --local`.
    """
    exp_conf = experiment.load_experiment(args.experiment, args.set)
    # The YAML's environment variables, as a cluster sets them (e.g. MLFLOW_TRACKING_URI); ones
    # already set in the shell win, so a local run can point elsewhere.
    env = experiment.environment_variables(exp_conf, torch.cuda.is_available())
    for name in [name for name in env if name not in os.environ]:
        os.environ[name] = env[name]
        print(f"environment.environment_variables: set {name}", flush=True)
    hparams = experiment.local_hparams(exp_conf.get("hyperparameters") or {})
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    # Determined's local checkpoints go to $XDG_DATA_HOME/determined: keep them under --output.
    os.environ["XDG_DATA_HOME"] = str(output)
    storage = output / "determined"
    latest, resumed_batches = None, 0
    if args.resume:
        resume = Path(args.resume).resolve()
        if not (resume / "metadata.json").is_file():
            raise SystemExit(f"--resume {args.resume}: not a checkpoint folder (no metadata.json).")
        storage.mkdir(exist_ok=True)
        if resume.parent != storage:
            try:
                (storage / resume.name).symlink_to(resume, target_is_directory=True)
            except FileExistsError:  # an earlier resume, or another rank, linked it already
                pass
        latest = resume.name
        resumed_batches = json.loads((resume / "metadata.json").read_text())["steps_completed"]
    metrics_path = output / "metrics.jsonl"
    distributed = local_distributed()
    chief = distributed is None or distributed.rank == 0
    with det.pytorch.init(
        hparams=hparams,
        exp_conf=exp_conf,
        distributed=distributed,
        aggregation_frequency=accumulative_counts(hparams),
    ) as context:
        # Local TensorBoard files: Determined would write them to ./runs of the working directory.
        context._core.train._tbd_directory = output / "tensorboard"
        trial = trial_class(context, resumed_batches=resumed_batches)
        length = (
            trial.max_batches
            if args.max_batches is None
            else min(args.max_batches, trial.max_batches)
        )
        if chief:
            trial.callbacks["local_report"] = LocalReport(metrics_path, length)
        period = pytorch.Batch(min(trial.validation_batches, length))
        det.pytorch.Trainer(trial, context).fit(
            max_length=pytorch.Batch(length),
            validation_period=period,
            checkpoint_period=period,
            reporting_period=pytorch.Batch(args.report_every),
            latest_checkpoint=latest,
        )
    if distributed is not None:
        torch.distributed.destroy_process_group()
    if chief:
        print_final_validation(metrics_path)
    return metrics_path


def print_final_validation(metrics_path: Path) -> None:
    if not metrics_path.is_file():
        print("Nothing was trained: the run had already reached its length.")
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    validations = [r for r in records if r["kind"] == "validation"]
    if not validations:
        print("No validation was reported.")
        return
    last = validations[-1]
    print(f"\nValidation after {last['batches']} batches:")
    for name, value in last["metrics"].items():
        if name.startswith(("bbox_", "segm_")):
            print(f"  {name:<18} {value:.3f}")
    print(f"Checkpoints: {metrics_path.parent / 'determined'}  Metrics: {metrics_path}")
