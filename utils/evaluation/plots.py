"""The evaluation plots of a report (utils/evaluation/report.py), drawn by matplotlib as RGB images.

Each figure draws on its own Agg canvas (no pyplot, no display, no global state), small: about
800 px wide. Per IoU type: `<task>_pr_curves` (IoU 0.5 and 0.5:0.95, each class with its AP and
all classes), `<task>_threshold_curves` (precision, recall and F1 against the score threshold,
the best-F1 threshold marked), `<task>_errors` (TIDE's AP50 cost of each error type, and the
reliability diagram of the scores); for boxes `bbox_confusion_matrix` (counts and
row-normalised).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from utils.evaluation.diagnostics import TIDE_LABELS

DPI = 80
# Up to this many classes each gets a coloured, labelled curve; beyond, thin grey ones.
MAX_LABELLED = 20
# Up to this many rows the confusion matrix's cells carry their numbers.
MAX_ANNOTATED = 30
ALL_COLOUR = "#1f3d99"
BEST_COLOUR = "#d62728"


def draw_report(report: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every plot of the report, by name."""
    drawings = {}
    for task, data in report["tasks"].items():
        drawings[f"{task}_pr_curves"] = draw_pr_curves(task, data["pr_curves"])
        drawings[f"{task}_threshold_curves"] = draw_threshold_curves(task, data["threshold_curves"])
        if "tide" in data:
            drawings[f"{task}_errors"] = draw_errors(task, data["tide"], data["calibration"])
    if "confusion_matrix" in report:
        drawings["bbox_confusion_matrix"] = draw_confusion_matrix(report["confusion_matrix"])
    return drawings


def _figure(
    width: float, height: float, panels: int, margins: tuple[float, float] = (0.6, 0.5)
) -> tuple[Figure, list[Any]]:
    """A row of `panels` axes; `margins`: the room in inches left of each axis and below it, for
    the labels. Fixed margins: matplotlib's constrained layout doubles the drawing time."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    left, bottom = margins
    right, top = 0.15, 0.35
    axis_width = (width - left - right - (panels - 1) * left) / panels
    figure.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=left / axis_width,
    )
    return figure, list(np.atleast_1d(figure.subplots(1, panels)))


def _unit_axes(axis: Any, xlabel: str, ylabel: str) -> None:
    """0 to 1 on both axes, labelled at 0, 0.5 and 1, gridded every 0.25: tick labels are most
    of matplotlib's drawing time, so few and fixed."""
    axis.set(xlim=(0, 1), ylim=(0, 1.02))
    axis.set_xlabel(xlabel, labelpad=1)
    axis.set_ylabel(ylabel, labelpad=1)
    for side in (axis.xaxis, axis.yaxis):
        side.set_major_locator(FixedLocator([0, 0.5, 1]))
        side.set_major_formatter(FixedFormatter(["0", "0.5", "1"]))
        side.set_minor_locator(FixedLocator([0.25, 0.75]))
    axis.grid(alpha=0.3, which="both")


def _image(figure: Figure) -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _class_lines(axis: Any, x: list[float], classes: dict[str, Any], key: str, label: Any) -> None:
    """One line per class: coloured and labelled for a few classes, thin grey for many."""
    many = len(classes) > MAX_LABELLED
    for name, curve in classes.items():
        values = np.array(curve[key], dtype=float)  # None (undefined) becomes NaN: a gap
        if many:
            axis.plot(x, values, color="0.6", linewidth=0.5, alpha=0.6)
        else:
            axis.plot(x, values, linewidth=1.0, label=label(name, curve))


def draw_pr_curves(task: str, curves: dict[str, Any]) -> np.ndarray:
    """Precision against recall at IoU 0.5 and averaged over 0.5:0.95, with each curve's AP."""
    figure, axes = _figure(10, 4.4, 2)
    recall = curves["recall"]
    for axis, key in zip(axes, ("0.5", "0.5:0.95"), strict=True):
        part = curves[key]
        _class_lines(axis, recall, part["classes"], "precision", lambda n, c: f"{n} {c['ap']:.3f}")
        axis.plot(
            recall,
            part["all"]["precision"],
            color=ALL_COLOUR,
            linewidth=2.5,
            label=f"all classes {part['all']['ap']:.3f}",
        )
        what = "mean over IoU 0.5:0.95" if ":" in key else "IoU 0.5"
        _unit_axes(axis, "recall", "precision")
        axis.set_title(f"{task} precision-recall, {what}", fontsize=10)
        axis.legend(loc="lower left", fontsize=7, title="AP", title_fontsize=7)
    return _image(figure)


def draw_threshold_curves(task: str, curves: dict[str, Any]) -> np.ndarray:
    """Precision, recall and F1 (IoU 0.5) against the score threshold; the best F1 marked."""
    figure, axes = _figure(12, 3.8, 3)
    thresholds, best = curves["score_thr"], curves["best"]
    for axis, key in zip(axes, ("precision", "recall", "f1"), strict=True):
        _class_lines(axis, thresholds, curves["classes"], key, lambda name, _: name)
        values = np.array(curves["all"][key], dtype=float)
        axis.plot(thresholds, values, color=ALL_COLOUR, linewidth=2.5, label="mean of classes")
        axis.axvline(best["score_thr"], color=BEST_COLOUR, linestyle="--", linewidth=1)
        _unit_axes(axis, "score threshold", key)
        axis.set_title(f"{task} {'F1' if key == 'f1' else key}, IoU 0.5", fontsize=10)
    axes[2].plot([best["score_thr"]], [best["f1"]], "o", color=BEST_COLOUR)
    axes[2].set_title(
        f"{task} F1: best {best['f1']:.3f} at score {best['score_thr']:.3f}", fontsize=10
    )
    axes[0].legend(loc="lower left", fontsize=7)
    return _image(figure)


def draw_confusion_matrix(matrix: dict[str, Any]) -> np.ndarray:
    """Counts and row-normalised counts (each object class's row, and background's, sums to 1)."""
    counts = np.array(matrix["counts"], dtype=np.int64)
    names = matrix["classes"]
    size = len(names)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    font = 8 if size <= 12 else 6 if size <= MAX_ANNOTATED else 4
    label = 0.3 + max(len(name) for name in names) * font * 0.6 / 72  # inches for tick labels
    side = min(max(4.0, 0.2 * size + 1), 9)
    figure, axes = _figure(2 * (side + label) + 0.2, side + label, 2, (label + 0.25, label + 0.3))
    for axis, values, title in zip(
        axes, (counts, normalised), ("boxes", "row-normalised"), strict=True
    ):
        axis.imshow(values, cmap="Blues", vmin=0)
        axis.set_xticks(range(size), names, rotation=90, fontsize=font)
        axis.set_yticks(range(size), names, fontsize=font)
        axis.xaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_minor_locator(NullLocator())
        axis.set(xlabel="detected as", ylabel="ground truth")
        axis.set_title(
            f"bbox confusion matrix ({title}), IoU {matrix['iou_thr']:g}, "
            f"score >= {matrix['score_thr']:g}",
            fontsize=9,
        )
        if size <= MAX_ANNOTATED:
            top = values.max() or 1
            for (row, column), value in np.ndenumerate(values):
                if value:
                    axis.text(
                        column,
                        row,
                        f"{value:d}" if values is counts else f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=font,
                        color="white" if value > top / 2 else "black",
                    )
    return _image(figure)


def draw_errors(task: str, tide: dict[str, Any], calibration: dict[str, Any]) -> np.ndarray:
    """TIDE: the AP50 each error type costs, with its count; and the reliability diagram: each
    score bin's share of true positives against its mean score, the diagonal perfect."""
    figure, (errors, reliability) = _figure(10, 3.8, 2, (0.9, 0.5))
    names = list(TIDE_LABELS)
    costs = [tide["delta_ap"][name] for name in names]
    colours = [ALL_COLOUR] * 6 + ["0.55"] * 2  # the error types, then the two totals
    positions = np.arange(len(names))[::-1]
    errors.barh(positions, costs, color=colours, height=0.7)
    errors.set_yticks(positions, [TIDE_LABELS[name] for name in names], fontsize=8)
    errors.yaxis.set_minor_locator(NullLocator())
    top = max(max(costs), 0.01)
    errors.set_xlim(0, top * 1.3)
    for position, name, cost in zip(positions, names, costs, strict=True):
        count = tide["counts"].get(name)
        label = f"{cost:.3f}" + (f" ({count})" if count is not None else "")
        errors.text(cost + top * 0.01, position, label, va="center", fontsize=7)
    errors.set_xlabel("AP50 gained if fixed", labelpad=1)
    errors.grid(alpha=0.3, axis="x")
    errors.set_title(f"{task} TIDE errors, AP50 {tide['ap50']:.3f}", fontsize=10)

    bins = [b for b in calibration["bins"] if b["count"]]
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    width = calibration["bins"][0]["upper"] - calibration["bins"][0]["lower"]
    reliability.bar(
        centres, [b["accuracy"] for b in bins], width=width * 0.9, color=ALL_COLOUR,
        label="true positives",
    )  # fmt: skip
    reliability.plot(
        [b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color=BEST_COLOUR,
        markersize=3, label="at the mean score",
    )  # fmt: skip
    reliability.plot([0, 1], [0, 1], "--", color="0.4", linewidth=1, label="calibrated")
    _unit_axes(reliability, "score", f"share true at IoU {calibration['iou_thr']:g}")
    reliability.legend(loc="upper left", fontsize=7)
    reliability.set_title(
        f"{task} calibration: ECE {calibration['ece']:.3f}, {calibration['detections']} detections",
        fontsize=10,
    )
    return _image(figure)
