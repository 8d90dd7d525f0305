"""The metric names a run's validation reports, and a searcher metric checked against them.

A validation reports what `CocoEvaluator.compute` returns for the config's `val_evaluator` (a
CocoMetric's statistics, best-F1 keys and per-class AP, a VOCMetric's mAP, `num_images`), and
both engines add `batches` and `epochs` to it (Determined's PyTorchTrial; `on_ray.worker`'s
report). That is what searchers read: Determined's searcher and checkpoint ranking take
`searcher.metric` from the validation metrics, and Ray Tune from the reports made with each
checkpoint. The training metrics (the loss terms, `lr`, `grad_norm`) are reported apart and no
searcher sees them.

A name in `reported_metrics` may be a pattern (`fnmatch`): `bbox_AP_per_class/*` where the
classes are not known before the data is read, `*` for an evaluator whose names this module
does not know.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
from typing import Any

from mmengine.config import Config

from utils.base.errors import ConfigError
from utils.config.tree import base_dataset, evaluator_configs
from utils.data.voc import VOC_METRIC
from utils.evaluation.coco_metric import CLASSWISE_MAX_CLASSES, F1_KEYS, STAT_NAMES
from utils.evaluation.evaluator import COCO_ITEMS, flatten_metrics
from utils.evaluation.preflight import COCO_METRIC_TYPES, as_list, predicts_masks

logger = logging.getLogger(__name__)

# What the engines add to every validation's metrics.
ENGINE_KEYS = ("batches", "epochs")
ANY_NAME = "*"
VOC_METRIC_TYPES = ("VOCMetric", "mmdet.VOCMetric", VOC_METRIC)
# mmdet's CocoMetric default `proposal_nums`, which `proposal_fast` names its recalls after.
PROPOSAL_NUMS = (100, 300, 1000)
# The evaluator keys that hold one value or several, with mmdet's defaults (CocoMetric's
# `metric` and `proposal_nums`, VOCMetric's `iou_thrs`).
LISTED = {"metric": "bbox", "proposal_nums": PROPOSAL_NUMS, "iou_thrs": 0.5}
# The training metrics: the detector's loss terms (`loss`, `loss_cls`, ...), `lr`, `grad_norm`.
TRAINING_METRIC = re.compile(r"^(loss(_\w+)?|lr|grad_norm)$")
LOSS = re.compile(r"(^|_)loss(_|$)")
# Better when larger: AP, AR, F1 and its precision and recall (not the F1's score threshold),
# in any case (a misspelt `bbox_map` is a problem and a warning).
LARGER_IS_BETTER = re.compile(
    r"(^|_)(mAP|AP|AR)(_|@|/|\d|$)|best_F1(_precision|_recall)?$", re.IGNORECASE
)


def reported_metrics(cfg: Config, model: Any | None = None) -> set[str]:
    """The metric names each validation of the run of `cfg` reports, as the engines get them.

    Args:
        cfg: the run's resolved config (`RunPlan.cfg`); prepared (`prepare_data`), its classes
            are known and give the per-class names, else those are patterns.
        model: the built detector, or None; a model that predicts no masks reports no `segm_*`
            (the run refuses a segm evaluator for it: `preflight.evaluation_problems`).
    """
    metainfo = base_dataset(cfg.val_dataloader.dataset).get("metainfo") or {}
    classes = metainfo.get("classes")
    masks = predicts_masks(model) if model is not None else None
    names = {"num_images", *ENGINE_KEYS}
    patterns = set()
    for metric_cfg in evaluator_configs(cfg.get("val_evaluator")):
        kind = metric_cfg.get("type")
        listed = {key: as_list(metric_cfg.get(key, value)) for key, value in LISTED.items()}
        if kind in COCO_METRIC_TYPES:
            coco, per_class = coco_names(metric_cfg, listed, classes, masks is not False)
            names |= coco
            patterns |= per_class
        elif kind in VOC_METRIC_TYPES and metric_cfg.get("metric", "mAP") == "mAP":
            names |= voc_names(metric_cfg, listed["iou_thrs"], prefixed=kind == VOC_METRIC)
        else:
            patterns.add(ANY_NAME)
    # The names `CocoEvaluator.compute` gives them (`AR@100` is reported as `AR_100`).
    return set(flatten_metrics(dict.fromkeys(names, 0.0))) | patterns


def coco_names(
    metric_cfg: Any, listed: dict[str, list[Any]], classes: Any | None, masks: bool = True
) -> tuple[set[str], set[str]]:
    """A CocoMetric's names as `BackendCocoMetric.compute_metrics` makes them, and the patterns
    of its per-class names when `classes` is None (not known yet); `listed`: its `LISTED` keys."""
    if metric_cfg.get("format_only"):
        return set(), set()  # mmdet only writes the result files
    # CocoEvaluator's default is all 12 statistics; an explicit None is mmdet's first six.
    items = metric_cfg.get("metric_items", COCO_ITEMS)
    items = [items] if isinstance(items, str) else items
    classwise = metric_cfg.get("classwise")
    names, patterns = set(), set()
    for metric in listed["metric"]:
        if metric == "proposal_fast":
            names |= {f"AR@{count}" for count in listed["proposal_nums"]}
        elif metric == "proposal":
            names |= set(items or STAT_NAMES[6:])
        elif metric == "bbox" or (metric == "segm" and masks):
            names |= {f"{metric}_{item}" for item in items or STAT_NAMES[:6]}
            names |= {f"{metric}_{key}" for key in F1_KEYS.values()}
            if classes is None:
                if classwise is not False:
                    patterns.add(f"{metric}_AP_per_class/{ANY_NAME}")
            elif classwise or (classwise is None and len(classes) <= CLASSWISE_MAX_CLASSES):
                names |= {f"{metric}_AP_per_class/{name}" for name in classes}
    return names, patterns


def voc_names(metric_cfg: Any, iou_thrs: list[float], prefixed: bool) -> set[str]:
    """mmdet's VOCMetric's mAP and AP per IoU threshold; `voc_mAP`, ... when prefixed
    (`utils.data.voc.register_voc_metric`)."""
    names = {"mAP"} | {f"AP{int(t * 100):02d}" for t in iou_thrs}
    if not prefixed:
        return names
    prefix = metric_cfg.get("prefix") or "pascal_voc"  # VOCMetric's default prefix
    return {f"{prefix}_{name}" for name in names}


def searcher_metric_problems(
    metric: str, smaller_is_better: bool, reported: set[str]
) -> tuple[list[str], list[str]]:
    """`searcher.metric` checked against the `reported` names (`reported_metrics`): problems
    (it is not reported: the run would fail at its first validation) and warnings (the
    direction contradicts the metric: the searcher would keep the worst trials)."""
    problems, warnings = [], []
    if not any(fnmatch.fnmatchcase(metric, name) for name in reported):
        problems.append(unreported_problem(metric, reported))
    if smaller_is_better and LARGER_IS_BETTER.search(metric):
        warnings.append(
            f"searcher.smaller_is_better is true (Determined's default) but {metric} is better "
            "when larger: the searcher would keep the worst trials; set smaller_is_better: false."
        )
    elif not smaller_is_better and LOSS.search(metric):
        warnings.append(
            f"searcher.smaller_is_better is false but {metric} is a loss, better when smaller: "
            "the searcher would keep the worst trials; set smaller_is_better: true."
        )
    return problems, warnings


def unreported_problem(metric: str, reported: set[str]) -> str:
    """Why `metric` is not a searcher metric of this run, the close names and the others."""
    concrete = sorted(name for name in reported if "*" not in name)
    same_case = [name for name in concrete if name.lower() == metric.lower()]
    close = same_case or difflib.get_close_matches(metric, concrete, n=3)
    if TRAINING_METRIC.match(metric):
        why = "is a training metric; searchers read the validation's metrics"
    elif metric.startswith("segm_") and not any(n.startswith("segm_") for n in reported):
        why = "is not reported: the run evaluates no masks (val_evaluator.metric)"
        close = [name for name in concrete if name == f"bbox_{metric[5:]}"] or close
    else:
        why = "is not a metric this run's validation reports (a cluster trial would fail there)"
    hint = f"Did you mean {' or '.join(close)}? " if close else ""
    # The per-class names can be many: one `<class>` name per IoU type.
    listing = [name for name in concrete if "_per_class/" not in name]
    listing += sorted(
        {f"{name.split('/')[0]}/<class>" for name in reported if "_per_class/" in name}
    )
    return (
        f"searcher.metric {metric!r} {why}. {hint}Set searcher.metric to one it reports: "
        f"{', '.join(listing)} (from the config's val_evaluator and the model)."
    )


def searcher_findings(
    cfg: Config, searcher: dict[str, Any], model: Any | None = None
) -> tuple[list[str], list[str]]:
    """The experiment's `searcher` (its `metric` and `smaller_is_better`) checked against the
    run of `cfg` (see `reported_metrics`): (problems, warnings). A searcher without a metric
    name is the experiment rules' to report."""
    metric = searcher.get("metric")
    if not isinstance(metric, str):
        return [], []
    smaller = bool(searcher.get("smaller_is_better", True))  # Determined's default
    return searcher_metric_problems(metric, smaller, reported_metrics(cfg, model))


def check_searcher(
    cfg: Config, searcher: dict[str, Any], model: Any | None = None, refuse: bool = True
) -> None:
    """`searcher_findings` at a run's start: the problems raised as a ConfigError when `refuse`,
    else logged as warnings, as the warnings are."""
    problems, warnings = searcher_findings(cfg, searcher, model)
    if problems and refuse:
        raise ConfigError(" ".join(problems))
    for message in [*problems, *warnings]:
        logger.warning(message)
