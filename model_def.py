"""Train MMDetection 3.x detectors with Determined: the PyTorchTrial and the entry point.

On a cluster the experiment's entrypoint runs this file:
    python3 -m determined.launch.torch_distributed python3 model_def.py
Locally, without a cluster, through the same Determined Trainer:
    python model_def.py EXPERIMENT.yaml --local [--max-batches N] [--set KEY=VALUE] [--output DIR]
A checkpoint's detector for MMDetection's tools, and batch inference with it:
    python model_def.py export CHECKPOINT --out DIR
    python model_def.py predict CHECKPOINT INPUT... --out DIR

Only this file and det_support.py (its callbacks and local runs) talk to Determined; everything
in utils/ is plain MMDetection/MMEngine/PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
import warnings
from typing import Any

from utils.versions import check_versions

# mmengine imports pkg_resources (hence setuptools<82); its deprecation notice is noise for users.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

# Before mmdet is imported: on a wrong mmcv it fails with a bare assert.
check_versions()

import determined as det  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# Determined imports TensorBoard's writer at the first metrics report: a stall of about 0.2 s in
# the middle of training, which importing it here moves to start-up.
import torch.utils.tensorboard  # noqa: E402
from determined import pytorch  # noqa: E402
from mmdet.registry import DATASETS, MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.runner import set_random_seed  # noqa: E402

from det_support import (  # noqa: E402
    BeforeValidation,
    EmaRestore,
    MlflowTracking,
    MMDetExport,
    PredictionImages,
    local_checkpoint,
    run_local,
)
from utils import experiment, export, predict  # noqa: E402
from utils.annotations import AnnotationError  # noqa: E402
from utils.check import check_experiment  # noqa: E402
from utils.config import (  # noqa: E402
    accumulative_counts,
    build_config,
    training_length,
    unfollowed_intervals,
)
from utils.data import (  # noqa: E402
    GroupedBatchSampler,
    LoaderSeedDraws,
    LoudDataset,
    SeededDataset,
)
from utils.datasource import DataError  # noqa: E402
from utils.evaluation import CocoEvaluator  # noqa: E402
from utils.hooks import (  # noqa: E402
    EmaWeights,
    PipelineSchedule,
    plan_hooks,
    publish_runtime_info,
    use_l1_loss,
    yolox_switch_epoch,
)
from utils.optim import (  # noqa: E402
    ParamSchedulers,
    amp_settings,
    build_optimizer,
    clip_gradients,
)
from utils.tracking import MlflowRun, mlflow_settings  # noqa: E402
from utils.visualize import visualization_settings  # noqa: E402
from utils.weights import load_weights  # noqa: E402

logger = logging.getLogger("model_def")

# Determined 0.38 checkpoints hold numpy's RNG state, and it restores them with torch.load's
# default weights_only=True (torch >= 2.6), which refuses numpy arrays unless allowed here.
torch.serialization.add_safe_globals(
    [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
)


class EvaluatorReducer(pytorch.MetricReducer):
    """Gathers every rank's COCO entries and evaluates them once, on the chief."""

    def __init__(self, evaluator: CocoEvaluator) -> None:
        self.evaluator = evaluator

    def reset(self) -> None:
        self.evaluator.reset()

    def update(self, data_samples: list[Any]) -> None:
        self.evaluator.update(data_samples)

    def per_slot_reduce(self) -> Any:
        return self.evaluator.entries

    def cross_slot_reduce(self, per_slot_metrics: list[Any]) -> dict[str, float]:
        return self.evaluator.compute(per_slot_metrics)


class MMDetTrial(pytorch.PyTorchTrial):
    """Any MMDetection 3.x detector config, trained and evaluated by Determined."""

    def __init__(
        self,
        context: pytorch.PyTorchTrialContext,
        resumed_batches: int = 0,
    ) -> None:
        """`resumed_batches`: batches already trained by a local checkpoint being resumed."""
        self.context = context
        self.callbacks: dict[str, pytorch.PyTorchCallback] = {"export": MMDetExport(self)}
        self.resumed_batches = resumed_batches
        register_all_modules(init_default_scope=True)
        slots = context.distributed.get_size()
        self.cfg = build_config(context.get_hparams(), context.get_data_config(), slots)
        hooks = plan_hooks(self.cfg)  # before anything is built: an unsupported hook fails fast
        self.seed = trial_seed(self.cfg, context)
        set_random_seed(self.seed)

        # A copy: mmdet's detectors write into the config they are built from (roi_head.train_cfg,
        # ...), and self.cfg stays the resolved config as the checkpoints export it.
        self.detector = MODELS.build(copy.deepcopy(self.cfg.model))
        self.detector.init_weights()
        load_from = context.get_hparams().get("load_from") or self.cfg.get("load_from")
        if load_from:
            logger.info("Pretrained weights: %s", load_weights(self.detector, load_from))
        # Mixed precision where the config asks for it (AmpOptimWrapper); the scaler is wrapped
        # before the model, as Determined requires.
        self.amp = amp_settings(self.cfg, torch.cuda.is_available())
        self.scaler = None
        if self.amp:
            logger.info("Mixed precision: %s autocast on %s.", self.amp.dtype, self.amp.device)
            if self.amp.loss_scale is not None:
                self.scaler = context.wrap_scaler(self.amp.grad_scaler())
        self.model = context.wrap_model(self.detector)
        optimizer, self.clip_grad = build_optimizer(self.detector, self.cfg)
        # Gradient accumulation: Determined steps (and averages the gradients) every this many
        # batches; the engine was started with it as its aggregation frequency.
        self.accumulation = self.cfg.optim_wrapper.get("accumulative_counts", 1)
        self.optimizer = context.wrap_optimizer(optimizer)

        self.train_dataset = build_dataset(self.cfg, "train")
        self.val_dataset = build_dataset(self.cfg, "val")
        global_batch = context.get_global_batch_size()
        self.epoch_length = -(-len(self.train_dataset) // global_batch)
        searcher = context.get_experiment_config().get("searcher") or {}
        length, unit = experiment.training_length(searcher) or training_length(self.cfg)
        self.max_batches = length * self.epoch_length if unit == "epochs" else length
        val_interval = self.cfg.train_cfg.get("val_interval", 1)
        by_epoch = self.cfg.train_cfg.get("type", "EpochBasedTrainLoop") == "EpochBasedTrainLoop"
        self.validation_batches = val_interval * self.epoch_length if by_epoch else val_interval
        note = unfollowed_intervals(self.cfg)
        if note:
            logger.warning(note)
        # The global torch generator advances where mmengine's would (see LoaderSeedDraws).
        self.seed_draws = LoaderSeedDraws(
            keeps_workers(self.cfg.train_dataloader),
            keeps_workers(self.cfg.val_dataloader),
            self.epoch_length,
        )
        self.batches_trained = resumed_batches
        # The config's custom hooks (utils/hooks.py), built once the model is on its device.
        self.max_epochs = -(-self.max_batches // self.epoch_length)
        self.ema = None
        if hooks.ema is not None:
            self.ema = EmaWeights(hooks.ema, self.detector, self.max_batches, self.epoch_length)
        if self.ema is not None or hooks.sync_norm:
            # First when validation starts (the averaged weights go back last, in "ema"): every
            # callback (prediction images) sees the validated weights, checkpoints the trained.
            self.callbacks = {
                "before_validation": BeforeValidation(self, hooks.sync_norm),
                **self.callbacks,
            }
        self.l1_from_epoch = None
        skip = None
        if hooks.yolox is not None:
            last, skipped = hooks.yolox
            self.l1_from_epoch = yolox_switch_epoch(last, self.max_epochs)
            skip = (self.l1_from_epoch, skipped)
        self.pipelines = (
            PipelineSchedule(self.train_dataset, hooks.switches, skip)
            if hooks.switches or skip
            else None
        )

        self.lr_scheduler = context.wrap_lr_scheduler(
            ParamSchedulers(self.optimizer, self.cfg, self.epoch_length, self.max_batches),
            step_mode=pytorch.LRScheduler.StepMode.STEP_EVERY_BATCH,
        )
        evaluator = CocoEvaluator(self.cfg, context.get_hparams().get("coco_backend"))
        evaluator.set_dataset_meta(self.val_dataset.metainfo)
        self.reducer = context.wrap_reducer(EvaluatorReducer(evaluator), for_training=False)
        num_images, score_thr = visualization_settings(context.get_hparams())
        self.callbacks["predictions"] = PredictionImages(self, num_images, score_thr)
        tracking = mlflow_settings(context.get_experiment_config())
        if tracking is not None and context.distributed.rank == 0:
            self.callbacks["mlflow"] = MlflowTracking(self, MlflowRun(tracking))
        if self.ema is not None:
            self.callbacks["ema"] = EmaRestore(self.ema)

    def build_training_data_loader(self) -> pytorch.DataLoader:
        loader_cfg = self.cfg.train_dataloader
        # On a cluster Determined skips the batches a resumed trial already trained; its local
        # mode restarts the data from the beginning, so local resumes skip them here.
        replicas = self.context.distributed.get_size()
        sampler = GroupedBatchSampler(
            self.train_dataset,
            self.context.get_per_slot_batch_size(),
            seed=self.seed,
            num_replicas=replicas,
            skip=self.resumed_batches * replicas,
        )
        return pytorch.DataLoader(
            SeededDataset(LoudDataset(self.train_dataset), self.seed, self.pipelines),
            batch_sampler=sampler,
            num_workers=loader_cfg.get("num_workers", 0),
            persistent_workers=loader_cfg.get("num_workers", 0) > 0,
            collate_fn=pseudo_collate,
            # Workers' seeds come from here, not from the global generator: exact resumes.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        loader_cfg = self.cfg.val_dataloader
        replicas = self.context.distributed.get_size()
        if len(self.val_dataset) < replicas:
            raise ValueError(
                f"The validation set has {len(self.val_dataset)} images, fewer than the "
                f"{replicas} slots that share it: use a larger set or fewer slots."
            )
        # Determined deals whole batches to ranks and refuses a rank without any: keep the
        # batches small enough that every rank gets one.
        batch_size = min(loader_cfg.get("batch_size", 1), -(-len(self.val_dataset) // replicas))
        return pytorch.DataLoader(
            LoudDataset(self.val_dataset),
            batch_size=batch_size,
            shuffle=False,
            num_workers=loader_cfg.get("num_workers", 0),
            persistent_workers=loader_cfg.get("num_workers", 0) > 0,
            collate_fn=pseudo_collate,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        # Locally resumed runs count batches from 0 again; on a cluster batch_idx continues.
        index = batch_idx + self.resumed_batches
        self.seed_draws.before_train_batch(index)
        self.batches_trained = index + 1
        epoch = index // self.epoch_length
        publish_runtime_info(index, epoch, self.max_batches, self.max_epochs)
        if self.l1_from_epoch is not None and epoch >= self.l1_from_epoch:
            use_l1_loss(self.detector)
        data = self.detector.data_preprocessor(batch, training=True)
        with self.amp.autocast() if self.amp else contextlib.nullcontext():
            losses = self.model(**data, mode="loss")
        loss, log_vars = self.detector.parse_losses(losses)
        if not torch.isfinite(loss):
            # Stop before the step: the last checkpoint keeps the last good weights.
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in log_vars.items())
            batch_number = batch_idx + self.resumed_batches + 1
            raise RuntimeError(
                f"The loss is not finite at batch {batch_number} ({terms}): stopping. Lower the "
                "LR or enable optim_wrapper.clip_grad, and resume from the last checkpoint."
            )
        metrics = {name: value.item() for name, value in log_vars.items()}
        self.context.backward(self.scaler.scale(loss) if self.scaler else loss)

        def clip(params: Any) -> None:
            if self.scaler:  # clip the true gradients, not the scaled ones
                self.scaler.unscale_(self.optimizer)
            norm = float(clip_gradients(params, self.clip_grad))
            if self.accumulation == 1:  # with accumulation not every batch has one to report
                metrics["grad_norm"] = norm

        self.context.step_optimizer(
            self.optimizer, clip_grads=clip if self.clip_grad else None, scaler=self.scaler
        )
        if self.scaler and (batch_idx + 1) % self.accumulation == 0:  # after a real step only
            self.scaler.update(self.amp.static_scale())
        if self.ema is not None:  # every batch, as mmengine calls EMAHook after every iteration
            self.ema.after_batch(index)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def evaluate_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        if batch_idx == 0:
            self.seed_draws.before_validation(first=self.batches_trained <= self.validation_batches)
        data = self.detector.data_preprocessor(batch, training=False)
        with torch.no_grad():
            predictions = self.detector(**data, mode="predict")
        self.reducer.update(predictions)
        return {}

    def build_callbacks(self) -> dict[str, pytorch.PyTorchCallback]:
        return self.callbacks


def build_dataset(cfg: Any, split: str) -> Any:
    """The split's mmdet dataset; an empty one is an error naming what to check."""
    empty = DataError(
        f"The {split} dataset is empty after mmdet's filtering ({split}_dataloader.dataset."
        f"filter_cfg drops images without objects and small images): check data.{split}_ann "
        "and the filter settings."
    )
    try:
        dataset = DATASETS.build(cfg[f"{split}_dataloader"].dataset)
    except ValueError as err:
        # mmengine fails to serialise an empty data list with numpy's bare message.
        if "need at least one array to concatenate" in str(err):
            raise empty from err
        raise
    if len(dataset) == 0:
        raise empty
    return dataset


def keeps_workers(loader_cfg: Any) -> bool:
    """Whether mmengine's runner keeps this loader's workers (and iterator) between passes."""
    return bool(loader_cfg.get("persistent_workers")) and loader_cfg.get("num_workers", 0) > 0


def trial_seed(cfg: Any, context: pytorch.PyTorchTrialContext) -> int:
    """The config's `randomness.seed`, else Determined's trial seed, else 0 (local runs)."""
    seed = (cfg.get("randomness") or {}).get("seed")
    if seed is not None:
        return int(seed)
    try:
        return context.get_trial_seed()
    except det.errors.InternalException:
        return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("experiment", nargs="?", help="experiment YAML (local runs)")
    parser.add_argument("--local", action="store_true", help="train here, without a cluster")
    parser.add_argument(
        "--check", action="store_true", help="check the experiment before submitting it, then exit"
    )
    parser.add_argument("--max-batches", type=int, help="cap the training length (local)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key of the experiment YAML, e.g. data.backend=synthetic",
    )
    parser.add_argument("--output", default="runs/local", help="folder for checkpoints and metrics")
    parser.add_argument("--resume", help="checkpoint folder of an earlier local run to continue")
    parser.add_argument("--report-every", type=int, default=20, help="batches per training report")
    args = parser.parse_args(argv)
    if (args.local or args.check) and not args.experiment:
        parser.error("--local and --check need an experiment YAML")
    return args


def run_check(args: argparse.Namespace) -> int:
    """Print what the experiment would train, or its problems; returns the exit status."""
    exp_conf = experiment.load_experiment(args.experiment, args.set)
    summary, problems = check_experiment(exp_conf)
    print(f"{args.experiment}: {exp_conf.get('name', '')}")
    for line in summary:
        print(f"  {line}")
    if problems:
        print(f"{len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("OK: ready to submit with `det experiment create " + f"{args.experiment} .`")
    return 0


def run_on_cluster() -> None:
    info = det.get_cluster_info()
    frequency = accumulative_counts(info.trial.hparams) if info else 1
    with det.pytorch.init(aggregation_frequency=frequency) as context:
        trial = MMDetTrial(context)
        period = pytorch.Batch(trial.validation_batches)
        det.pytorch.Trainer(trial, context).fit(
            max_length=pytorch.Batch(trial.max_batches),
            validation_period=period,
            checkpoint_period=period,
            latest_checkpoint=info.latest_checkpoint if info else None,
        )


COMMANDS = {"export": export, "predict": predict}


def run_command(argv: list[str]) -> Any:
    """`export CHECKPOINT --out DIR` and `predict CHECKPOINT INPUT... --out DIR` (see --help)."""
    parser = argparse.ArgumentParser(prog="model_def.py")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        args.checkpoint = local_checkpoint(args.checkpoint)
        return COMMANDS[args.command].run(args)
    except (export.ExportError, predict.PredictError, AnnotationError, DataError) as err:
        raise SystemExit(f"{args.command}: {err}") from err
    except experiment.ExperimentError as err:  # export --experiment
        raise SystemExit(f"{args.command} --experiment: {err}") from err


def main(argv: list[str] | None = None) -> Any:
    """Train (locally or on a cluster), check an experiment, or run a command; returns what
    `export` (the folder) and `predict` (its summary) return."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
        return run_command(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    if args.check:
        sys.exit(run_check(args))
    if args.local:
        run_local(args, MMDetTrial)
    elif det.get_cluster_info() is None:
        raise SystemExit("Not on a Determined cluster: pass an experiment YAML and --local.")
    else:
        run_on_cluster()


if __name__ == "__main__":
    main(sys.argv[1:])
