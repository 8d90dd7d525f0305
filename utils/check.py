"""Pre-submission check of an experiment YAML, without a cluster and without the data.

Resolves the mmdet config with every override, builds the model on the CPU (no weights), checks
the hyperparameters the trial reads and the data section, and summarises what would run.
"""

from __future__ import annotations

from typing import Any

from mmdet.registry import DATASETS, MODELS
from mmdet.utils import register_all_modules

from utils.config import (
    KNOWN_HPARAMS,
    ConfigError,
    build_config,
    resolve_config_path,
    unfollowed_intervals,
)
from utils.config import training_length as config_training_length
from utils.datasource import DataError, base_dataset
from utils.evaluation import coco_backend
from utils.experiment import ExperimentError, local_hparams, training_length
from utils.hooks import plan_hooks, yolox_switch_epoch
from utils.tracking import TrackingError, mlflow_settings, redact
from utils.visualize import visualization_settings

NUMERIC = ("lr", "weight_decay", "momentum")
SEARCHER_KEYS = ("max_trials", "max_concurrent_trials", "time_metric", "max_time", "max_rungs")


def candidates(spec: Any) -> list[Any]:
    """The values a hyperparameter can take (a range gives its two ends)."""
    if not isinstance(spec, dict) or "type" not in spec:
        return [spec]
    kind = spec["type"]
    if kind == "const":
        return [spec.get("val")]
    if kind == "categorical":
        return list(spec.get("vals") or [])
    if kind == "log":
        base = spec.get("base", 10)
        return [base ** spec.get("minval", 0), base ** spec.get("maxval", 0)]
    return [spec.get("minval"), spec.get("maxval")]


def hparam_problems(specs: dict[str, Any], slots: int) -> list[str]:
    """Unknown names, wrong types, config files that do not resolve, batches that do not split."""
    problems = []
    for name, spec in specs.items():
        if name not in KNOWN_HPARAMS:
            known = ", ".join(KNOWN_HPARAMS)
            problems.append(f"hyperparameters.{name} is not read by the trial; known: {known}.")
            continue
        for value in candidates(spec):
            if name in ("config_file", "merge_config"):
                if not isinstance(value, str):
                    problems.append(f"hyperparameters.{name} must be a config path, not {value!r}.")
                    continue
                try:
                    resolve_config_path(value)
                except ConfigError as err:
                    problems.append(str(err))
            elif name == "global_batch_size":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    problems.append(
                        f"hyperparameters.global_batch_size {value!r} is not a positive int."
                    )
                elif value % slots:
                    problems.append(
                        f"hyperparameters.global_batch_size {value} does not divide by "
                        f"resources.slots_per_trial {slots}: make it a multiple."
                    )
            elif name in NUMERIC and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                problems.append(f"hyperparameters.{name} must be a number, not {value!r}.")
            elif name == "load_from" and not (isinstance(value, str) and value):
                problems.append(
                    f"hyperparameters.load_from must be a path, URL or gs:// path, not {value!r}."
                )
            elif name == "override_mmdet_config" and not isinstance(value, dict):
                problems.append(
                    "hyperparameters.override_mmdet_config must map dotted keys to values."
                )
            elif name == "coco_backend":
                try:
                    coco_backend(value)
                except ConfigError as err:
                    problems.append(str(err))
            elif name == "visualization":
                try:
                    visualization_settings({name: value})
                except ConfigError as err:
                    problems.append(str(err))
    return problems


def check_experiment(exp: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Returns the summary lines and the problems found (none means ready to submit)."""
    specs = exp.get("hyperparameters") or {}
    data = exp.get("data") or {}
    slots = (exp.get("resources") or {}).get("slots_per_trial", 1)
    searcher = exp.get("searcher") or {}
    problems = hparam_problems(specs, slots)
    try:
        tracking = mlflow_settings(exp)
    except TrackingError as err:
        tracking = None
        problems.append(str(err))
    try:
        length = training_length(searcher)
        cfg = build_config(local_hparams(specs), data, slots, verify_paths=False)
        hooks = plan_hooks(cfg)
        register_all_modules(init_default_scope=True)
        model = MODELS.build(cfg.model)
    except (ConfigError, DataError, ExperimentError) as err:
        # The same problem may be caught by both checks: report it once.
        return [], list(dict.fromkeys([*problems, str(err)]))
    except Exception as err:  # any build error of mmdet is a problem to report, not a crash
        return [], [*problems, f"building the model failed: {type(err).__name__}: {err}"]

    dataset = base_dataset(cfg.train_dataloader.dataset)
    classes = (dataset.get("metainfo") or {}).get("classes") or DATASETS.get(dataset.type).METAINFO[
        "classes"
    ]
    value, unit = length or config_training_length(cfg)
    images = (
        (data.get("synthetic") or {}).get("num_train")
        if data.get("backend") == "synthetic"
        else None
    )
    global_batch = cfg.train_dataloader.batch_size * slots
    if unit == "epochs" and images:
        length_text = f"{value} epochs = {value * -(-images // global_batch)} batches"
    elif unit == "epochs":
        length_text = f"{value} epochs (batches per epoch: training images / {global_batch})"
    else:
        length_text = f"{value} batches"
    evaluators = cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]
    optimizer = cfg.optim_wrapper.optimizer
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    summary = [
        f"model: {cfg.model.type}, {parameters:.1f} M parameters",
        f"classes: {len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})",
        f"metrics: {', '.join(str(m) for e in evaluators for m in _as_list(e.get('metric')))}",
        f"batch: {global_batch} = {slots} slots x {cfg.train_dataloader.batch_size} per slot",
        f"training length: {length_text}" + ("" if length else " (from the config's train_cfg)"),
        f"data: {data.get('backend', 'disk')} {data.get('root', '')}".rstrip(),
        f"searcher: {searcher.get('name')}, metric {searcher.get('metric')} "
        f"({'smaller' if searcher.get('smaller_is_better', True) else 'larger'} is better)"
        + "".join(f", {key} {searcher[key]}" for key in SEARCHER_KEYS if key in searcher),
        f"optimizer: {optimizer.type}, lr {optimizer.lr:g}"
        + (" (scaled to the global batch)" if specs.get("auto_scale_lr") else ""),
    ]
    if hooks.ema is not None:
        kind = hooks.ema.get("ema_type", "ExponentialMovingAverage")
        summary.append(f"EMA weights ({kind}): validated and exported")
    note = unfollowed_intervals(cfg)
    if note:
        summary.append(f"note: {note}")
    if hooks.yolox is not None:
        last, skipped = hooks.yolox
        start = (
            f"from epoch {yolox_switch_epoch(last, value) + 1} of {value}"
            if unit == "epochs"
            else f"for the last {last} epochs"
        )
        summary.append(
            f"YOLOX mode switch (num_last_epochs {last}): {start} without {', '.join(skipped)}, "
            "with the L1 loss"
        )
    if hooks.sync_norm:
        summary.append("norm statistics averaged over the ranks before each validation")
    for epoch, _ in hooks.switches:
        summary.append(f"training pipeline switch: from epoch {epoch + 1} (switch_epoch {epoch})")
    if tracking is not None:
        where = redact(tracking.tracking_uri or "MLflow's default store")
        summary.append(f"mlflow: experiment {tracking.experiment_name!r} at {where}")
    searched = [f"{k} ({v['type']})" for k, v in specs.items() if _is_searched(v)]
    if searched:
        summary.append(f"searched (a local run uses one value): {', '.join(searched)}")
    return summary, problems


def _is_searched(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("type") not in (None, "const")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]
