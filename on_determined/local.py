"""Local runs through Determined's own Trainer: one process, or one per slot under torchrun.

Determined's local mode leaves a few things to the caller, done here: where checkpoints and
TensorBoard files go, starting the process group, skipping the batches a resumed run trained.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import determined as det
import torch
from determined import pytorch

from on_determined.callbacks import CheckpointFirst, ValidationFailed
from on_determined.trial import MMDetTrial
from utils.base.errors import ExperimentError
from utils.experiment import load as experiment
from utils.training.keys import check_experiment_keys
from utils.training.plan import plan_run
from utils.training.progress import METRICS_FILE, print_final_validation
from utils.training.resumable import check_resumable


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


def resume_point(resume: str, storage: Path) -> tuple[str, int]:
    """The checkpoint name Determined's local mode restores from `storage` (linked there if it
    lies elsewhere), and the batches it trained."""
    folder = Path(resume).resolve()
    if not (folder / "metadata.json").is_file():
        raise ExperimentError(f"--resume {resume}: not a checkpoint folder (no metadata.json).")
    storage.mkdir(exist_ok=True)
    if folder.parent != storage:
        try:
            (storage / folder.name).symlink_to(folder, target_is_directory=True)
        except FileExistsError:  # an earlier resume, or another rank, linked it already
            pass
    return folder.name, json.loads((folder / "metadata.json").read_text())["steps_completed"]


def run_local(
    experiment_file: str,
    overrides: list[str],
    output: str | Path,
    *,
    max_batches: int | None = None,
    resume: str | None = None,
    report_every: int = 20,
    trial_class: type[MMDetTrial] = MMDetTrial,
) -> Path:
    """Train on this machine with Determined's Trainer; returns the path of `metrics.jsonl`.

    `trial_class`: the trial, or a subclass of it (the benchmarks time its batches)."""
    exp_conf = experiment.load_experiment(experiment_file, overrides)
    check_experiment_keys(exp_conf)
    # The YAML's environment variables, as a cluster sets them (e.g. MLFLOW_TRACKING_URI); ones
    # already set in the shell win, so a local run can point elsewhere.
    env = experiment.environment_variables(exp_conf, torch.cuda.is_available())
    for name in [name for name in env if name not in os.environ]:
        os.environ[name] = env[name]
        print(f"environment.environment_variables: set {name}", flush=True)
    hparams = experiment.local_hparams(exp_conf.get("hyperparameters") or {})
    # Planned once, here, before any process group or Determined context: the trial gets this
    # plan, and Determined the aggregation frequency from it. The processes are torchrun's.
    plan = plan_run(
        hparams,
        exp_conf.get("data") or {},
        world_size=max(int(os.environ.get("WORLD_SIZE", "1")), 1),
        searcher=exp_conf.get("searcher") or {},
    )
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    # Determined's local checkpoints go to $XDG_DATA_HOME/determined: keep them under --output.
    os.environ["XDG_DATA_HOME"] = str(output)
    latest, resumed_batches = None, 0
    if resume:
        latest, resumed_batches = resume_point(resume, output / "determined")
    metrics_path = output / METRICS_FILE
    distributed = local_distributed()
    chief = distributed is None or distributed.rank == 0
    with det.pytorch.init(
        hparams=hparams,
        exp_conf=exp_conf,
        distributed=distributed,
        aggregation_frequency=plan.accumulation,
    ) as context:
        # Local TensorBoard files: Determined would write them to ./runs of the working directory.
        context._core.train._tbd_directory = output / "tensorboard"
        trial = trial_class(
            context,
            resumed_batches=resumed_batches,
            max_batches=max_batches,
            report_to=metrics_path if chief else None,
            plan=plan,
        )
        if resume:
            check_resumable(resume, trial.session.cfg)
        period = pytorch.Batch(min(trial.session.schedule.validation_period, trial.max_batches))
        try:
            det.pytorch.Trainer(trial, context).fit(
                max_length=pytorch.Batch(trial.max_batches),
                validation_period=period,
                checkpoint_period=period,
                reporting_period=pytorch.Batch(report_every),
                latest_checkpoint=latest,
            )
        except CheckpointFirst as err:  # not as Determined's exit(0): the validation failed
            raise ValidationFailed(err.msg) from None
    if distributed is not None:
        torch.distributed.destroy_process_group()
    if chief:
        print_final_validation(metrics_path, output / "determined")
    return metrics_path
