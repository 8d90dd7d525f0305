"""What model_def.py needs from Determined besides the trial: its callbacks and local runs.

With model_def.py this is the only code that imports `determined`; each piece is thin and hands
the work to plain MMDetection/PyTorch code in utils/.

- Callbacks: the mmdet export and the prediction images in every checkpoint, MLflow tracking,
  and the progress report of local runs.
- Local runs through Determined's Trainer, one process or one per slot under torchrun. Its local
  mode leaves a few things to the caller, done here: where checkpoints and TensorBoard files go,
  starting the process group, skipping the batches a resumed run already trained.
- Fetching a checkpoint by UUID from a Determined master, for `export` and `predict`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import determined as det
import numpy as np
import torch
from determined import pytorch

from utils import experiment, export
from utils.config import accumulative_counts
from utils.datasource import DEFAULT_CACHE
from utils.hooks import EmaWeights, sync_norms
from utils.tracking import MlflowRun
from utils.visualize import render_samples, sample_indices, save_pngs

if TYPE_CHECKING:
    from model_def import MMDetTrial

logger = logging.getLogger(__name__)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class MMDetExport(pytorch.PyTorchCallback):
    """Writes `<checkpoint>/mmdet/` (model.pth, config.py), which MMDetection's tools load."""

    def __init__(self, trial: MMDetTrial) -> None:
        self.trial = trial

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        # Determined saves PyTorchTrial checkpoints (and calls this) on the chief only, into the
        # folder it then uploads: the rank check only guards against that changing.
        if self.trial.context.distributed.rank != 0:
            return
        path = Path(checkpoint_dir)
        # Determined wrote its trial state just before: the batches trained so far.
        state = pickle.loads((path / "trial_state.pkl").read_bytes())
        # With an EMAHook the averaged weights, as mmengine's checkpoints hold them.
        ema = self.trial.ema
        export.write_export(
            path / export.EXPORT_DIR,
            ema.averaged_weights() if ema is not None else self.trial.detector.state_dict(),
            self.trial.cfg,
            export.dataset_meta(self.trial.val_dataset.metainfo),
            state.get("batches_trained"),
        )


class BeforeValidation(pytorch.PyTorchCallback):
    """Registered first, as validation starts: the norm statistics averaged over the ranks
    (SyncNormHook), then the averaged weights (EMAHook) into the model, in mmengine's order."""

    def __init__(self, trial: MMDetTrial, sync_norm: bool) -> None:
        self.trial = trial
        self.sync_norm = sync_norm

    def on_validation_start(self) -> None:
        if self.sync_norm:
            sync_norms(self.trial.model)
        if self.trial.ema is not None:
            self.trial.ema.swap_in()


class EmaRestore(pytorch.PyTorchCallback):
    """Registered last: the trained weights come back once every other callback has seen the
    validated ones; the averaged weights are part of each checkpoint."""

    def __init__(self, ema: EmaWeights) -> None:
        self.ema = ema

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.ema.swap_out()

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.load_state_dict(state_dict)


class PredictionImages(pytorch.PyTorchCallback):
    """After each validation the chief draws a fixed set of validation images with their
    predictions: into TensorBoard (`predictions/<image>`) and into the next checkpoint."""

    def __init__(self, trial: MMDetTrial, num_images: int, score_thr: float) -> None:
        self.trial = trial
        self.indices = sample_indices(num_images, len(trial.val_dataset))
        self.score_thr = score_thr
        self.batches = 0
        self.drawings: dict[str, np.ndarray] = {}

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: str | None) -> None:
        self.batches = first_batch_idx

    def on_training_workload_end(
        self, avg_metrics: dict[str, Any], batch_metrics: dict[str, Any]
    ) -> None:
        self.batches = int(avg_metrics["batches"])

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        context = self.trial.context
        if context.distributed.rank != 0 or not self.indices:
            return
        self.drawings = render_samples(
            self.trial.detector, self.trial.val_dataset, self.indices, self.score_thr
        )
        if context.get_enable_tensorboard_logging():
            writer = context.get_tensorboard_writer()
            for name, drawing in self.drawings.items():
                writer.add_image(f"predictions/{name}", drawing, self.batches, dataformats="HWC")

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        if self.drawings:  # the last validation's, on the chief
            save_pngs(self.drawings, Path(checkpoint_dir) / "predictions")


class MlflowTracking(pytorch.PyTorchCallback):
    """Chief only: the trial as an MLflow run (utils/tracking.py). Registered after "export" and
    "predictions", so a checkpoint's files are written when it logs them."""

    def __init__(self, trial: MMDetTrial, run: MlflowRun) -> None:
        self.trial = trial
        self.run = run
        self.batches = 0
        self.resume_run_id: str | None = None  # from the checkpoint of a resumed trial

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_run_id = state_dict.get("run_id")

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: str | None) -> None:
        self.batches = first_batch_idx

    def on_training_start(self) -> None:  # after a resumed trial's checkpoint is loaded
        context = self.trial.context
        exp_conf = context.get_experiment_config()
        name = exp_conf.get("name") or "mmdet"
        tags = {"mmdet.config_file": str(context.get_hparams().get("config_file", ""))}
        info = det.get_cluster_info()
        if info is not None and info.task_type == "TRIAL":
            experiment_id, trial_id = info.trial.experiment_id, info.trial.trial_id
            name = f"{name} trial {trial_id}"
            tags |= {
                "determined.experiment_id": str(experiment_id),
                "determined.trial_id": str(trial_id),
                "determined.trial_url": f"{info.master_url.rstrip('/')}/det/experiments/"
                f"{experiment_id}/trials/{trial_id}",
            }
        description = exp_conf.get("description") or ""
        if self.run.start(name, description, tags, run_id=self.resume_run_id):
            data = {k: v for k, v in context.get_data_config().items() if k != "mlflow"}
            self.run.log_params({**context.get_hparams(), "data": data})
            self.run.log_text(self.trial.cfg.pretty_text, "config.py")

    def on_training_workload_end(
        self, avg_metrics: dict[str, Any], batch_metrics: dict[str, Any]
    ) -> None:
        self.batches = int(avg_metrics["batches"])
        metrics = {k: v for k, v in avg_metrics.items() if k != "batches"}
        self.run.log_metrics(metrics, step=self.batches)

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.run.log_metrics(metrics, step=self.batches)

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        self.run.log_checkpoint(checkpoint_dir, step=self.batches)

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        self.run.set_tag("determined.checkpoint_uuid", uuid)

    def on_trial_shutdown(self) -> None:
        # Determined calls this in a `finally`: while an exception (e.g. the non-finite loss
        # guard's) unwinds the trainer, sys.exc_info() holds it.
        error = sys.exc_info()[1]
        if isinstance(error, KeyboardInterrupt):
            status = "KILLED"
        elif error is not None:
            status = "FAILED"
        elif det.get_cluster_info() is not None and self.batches < self.trial.max_batches:
            status = "KILLED"  # paused, preempted or stopped early; a resumed trial reopens it
        else:
            status = "FINISHED"
        self.run.end(status)


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


def local_checkpoint(checkpoint: str) -> str:
    """A local folder as it is; a Determined checkpoint UUID downloaded (once) into the cache.

    The master and login are the `det` CLI's (DET_MASTER, `det user login`).
    """
    if Path(checkpoint).exists() or not UUID.fullmatch(checkpoint):
        return checkpoint
    from determined.experimental import client

    folder = DEFAULT_CACHE / "checkpoints" / checkpoint
    if not folder.is_dir():
        logger.info("Downloading checkpoint %s into %s", checkpoint, folder)
        partial = folder.with_name(f"{checkpoint}.partial")  # renamed once complete
        shutil.rmtree(partial, ignore_errors=True)
        try:
            client.get_checkpoint(checkpoint).download(str(partial))
        except Exception as err:  # Determined's errors: master unreachable, login, not found
            raise SystemExit(
                f"Checkpoint {checkpoint}: cannot fetch it from the Determined master ({err}). "
                "Set DET_MASTER and log in with `det user login`, or pass a local folder."
            ) from err
        partial.rename(folder)
    if not (folder / export.EXPORT_DIR / export.MODEL_FILE).is_file():  # an older checkpoint
        export.export_determined_checkpoint(folder, folder / export.EXPORT_DIR)
    return str(folder)
