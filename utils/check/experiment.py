"""Pre-submission check of an experiment YAML, on this machine, without a cluster.

It reads the run's plan (`utils.training.plan.plan_run`: the resolved mmdet config, hook plan
and batch split, as the session gets it), builds the model on the CPU (no weights), and checks
what a Determined 0.38.1 master would reject in the searcher, hyperparameters and resources
(`utils.experiment.rules`), the keys the trial reads (`utils.training.keys`), the
hyperparameters' values, that the config files are in the uploaded context
(`on_determined.context`), and what the first validation would fail on
(`utils.evaluation.preflight`), and that the searcher's metric is one the validation reports
(`utils.evaluation.metric_names`). Data on this machine is prepared and read as the trial would
(`prepare_data`, `utils.check.data`): classes, image counts, the `Schedule` and the bad-data
checks; data elsewhere is named with the checks that could not be made.
"""

from __future__ import annotations

from typing import Any

from mmdet.registry import MODELS

from utils.base.errors import USER_ERRORS, TrackingError
from utils.check.data import UNCHECKED, DataReport, EngineRules, locate_data, read_data
from utils.check.hparams import hparam_problems
from utils.config.schedule import by_epoch, config_length, unfollowed_intervals
from utils.config.tree import base_dataset, evaluator_configs
from utils.evaluation.metric_names import searcher_findings
from utils.evaluation.preflight import as_list, evaluation_problems
from utils.experiment.load import local_hparams
from utils.experiment.rules import hyperparameters_problems, submission_problems
from utils.training.hooks import yolox_switch_epoch
from utils.training.keys import data_key_problems, hyperparameter_key_problems, known_part
from utils.training.plan import RunPlan, plan_run
from utils.training.sanity import sanity_problems
from utils.training.session import prepare_data
from utils.training.tracking import redact
from utils.training.tracking_settings import mlflow_settings

SEARCHER_KEYS = ("max_trials", "max_concurrent_trials", "time_metric", "max_time", "max_rungs")
# A check without an engine's rules: every file is in the container, nothing is mounted.
NO_ENGINE_RULES = EngineRules()


def processes(exp: dict[str, Any]) -> int:
    """The processes sharing each global batch: `resources.slots_per_trial`, at least one (a
    trial of 0 slots runs one process; a wrong value is `expconf_rules`' to report)."""
    resources = exp.get("resources")
    slots = resources.get("slots_per_trial", 1) if isinstance(resources, dict) else 1
    valid = isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1
    return slots if valid else 1


def check_experiment(
    exp: dict[str, Any], rules: EngineRules = NO_ENGINE_RULES
) -> tuple[list[str], list[str]]:
    """Returns the summary lines and the problems found (none means ready to submit).

    `rules`: what the engine adds (config files its containers would not have, data they
    mount), e.g. `on_determined.context.DETERMINED_RULES`."""
    specs = exp.get("hyperparameters") or {}
    data = exp.get("data") or {}
    searcher = exp.get("searcher") or {}
    slots = processes(exp)
    problems = submission_problems(exp)  # a searcher that is not a mapping among them
    searcher = searcher if isinstance(searcher, dict) else {}
    if not isinstance(data, dict):
        return [], [*problems, f"data is {data!r}: write a mapping with a backend and its keys."]
    problems += hyperparameter_key_problems(specs) + data_key_problems(data)
    if not isinstance(specs, dict) or hyperparameters_problems(specs):
        return [], problems  # no values to plan with (the problems say why)
    problems += hparam_problems(specs, slots, rules.file_problem)
    try:
        tracking = mlflow_settings(exp)
    except TrackingError as err:
        tracking = None
        problems.append(str(err))
    place = locate_data(exp, rules)
    if place.problem:
        problems.append(place.problem)
    try:
        hparams, known_data = known_part(local_hparams(specs), data)
        plan = plan_run(hparams, known_data, world_size=slots, searcher=searcher)
        if place.here:  # the data readied as the session readies it: generated, checked
            plan = prepare_data(plan)
        model = MODELS.build(plan.cfg.model)
        report = read_data(plan) if place.here else None
        if report is not None and not report.problems:  # the sanity pass: the run's code ran
            problems += sanity_problems(plan, model)
    except USER_ERRORS as err:
        # The same problem may be caught by both checks: report it once.
        return [], list(dict.fromkeys([*problems, str(err)]))
    except Exception as err:  # any build error of mmdet is a problem to report, not a crash
        return [], [*problems, f"building the run failed: {type(err).__name__}: {err}"]
    problems += evaluation_problems(plan.cfg, model)  # what the first validation would fail on
    found, warnings = searcher_findings(plan.cfg, searcher, model)  # with the classes read
    problems += found
    if report is not None:
        problems += report.problems

    cfg, hooks = plan.cfg, plan.hooks
    evaluators = evaluator_configs(cfg.val_evaluator)
    optimizer = cfg.optim_wrapper.optimizer
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    global_batch = plan.global_batch
    summary = [
        f"model: {cfg.model.type}, {parameters:.1f} M parameters",
        classes_line(plan, data, report),
        f"metrics: {', '.join(str(m) for e in evaluators for m in as_list(e.get('metric')))}",
        f"batch: {global_batch} = {slots} slots x {cfg.train_dataloader.batch_size} per slot",
        length_line(plan, report),
        data_line(plan, data, report),
    ]
    if report is None:
        why = place.elsewhere or "the data is not on this machine"
        summary.append(f"not checked here ({why}): {UNCHECKED}")
    summary += [
        f"searcher: {searcher.get('name')}, metric {searcher.get('metric')} "
        f"({'smaller' if searcher.get('smaller_is_better', True) else 'larger'} is better)"
        + "".join(f", {key} {searcher[key]}" for key in SEARCHER_KEYS if key in searcher),
        *(f"warning: {warning}" for warning in warnings),
        f"optimizer: {optimizer.type}, lr {optimizer.lr:g}"
        + (" (scaled to the global batch)" if specs.get("auto_scale_lr") else ""),
    ]
    if hooks.ema is not None:
        kind = hooks.ema.get("ema_type", "ExponentialMovingAverage")
        summary.append(f"EMA weights ({kind}): validated and exported")
    note = unfollowed_intervals(cfg)
    if note:
        summary.append(f"note: {note}")
    value, unit = plan.length or config_length(cfg)
    if hooks.yolox is not None:
        last, skipped = hooks.yolox
        epochs = report.schedule.max_epochs if report else value if unit == "epochs" else None
        start = (
            f"from epoch {yolox_switch_epoch(last, epochs) + 1} of {epochs}"
            if epochs
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


def classes_line(plan: RunPlan, data: dict[str, Any], report: DataReport | None) -> str:
    """The classes the run trains: read from the data here, else what is known without it."""
    given = data.get("classes")
    if report is not None:
        source = (
            "data.classes"
            if given
            else "the generated data"
            if data.get("backend") == "synthetic"
            else "the VOC config"
            if data.get("format") == "voc"
            else "the annotation file's categories"
        )
        return f"classes: {_names(report.classes)}, from {source}"
    if data.get("format") == "voc":  # VOC's classes come from the config, not from files
        metainfo = base_dataset(plan.cfg.train_dataloader.dataset).get("metainfo") or {}
        return f"classes: {_names(tuple(metainfo.get('classes') or ()))}"
    if given:
        return f"classes: {_names(tuple(given))}, from data.classes (not checked against the data)"
    return "classes: the annotation file's categories (not read here)"


def length_line(plan: RunPlan, report: DataReport | None) -> str:
    """How long the run trains and how often it validates."""
    value, unit = plan.length or config_length(plan.cfg)
    origin = "" if plan.length else " (from the config's train_cfg)"
    if report is not None:
        schedule = report.schedule
        epochs = f"{value} epochs = " if unit == "epochs" else ""
        return (
            f"training length: {epochs}{schedule.max_batches} batches ({schedule.epoch_length} "
            f"per epoch of {report.train_images} images / {plan.global_batch}), validation "
            f"every {schedule.validation_period} batches{origin}"
        )
    interval = (plan.cfg.get("train_cfg") or {}).get("val_interval", 1)
    if by_epoch(plan.cfg):
        every = "epoch" if interval == 1 else f"{interval} epochs"
    else:
        every = "batch" if interval == 1 else f"{interval} batches"
    if unit == "epochs":
        return (
            f"training length: {value} epochs (batches per epoch: training images / "
            f"{plan.global_batch}), validation every {every}{origin}"
        )
    return f"training length: {value} batches, validation every {every}{origin}"


def data_line(plan: RunPlan, data: dict[str, Any], report: DataReport | None) -> str:
    backend = data.get("backend", "disk")
    root = base_dataset(plan.cfg.train_dataloader.dataset).get("data_root", "")
    line = f"data: {backend}{' ' + data['format'] if data.get('format') else ''} {root}".rstrip()
    if report is not None:
        line += (
            f": {report.train_images} training images (after mmdet's filtering), "
            f"{report.val_images} validation images"
        )
    return line


def _names(classes: tuple[str, ...]) -> str:
    return f"{len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"


def _is_searched(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("type") not in (None, "const")
