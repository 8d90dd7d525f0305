"""Run the benchmarks, print the table and write the report.

    python -m bench.run [--quick] [--repeats N] [--sections NAME ...] [--out docs/benchmarks.md]

Each section is a module bench/<name>.py with `measure(quick: bool) -> list[dict]` (one dict per
row: measure, unit, ours, baseline, baseline_name, ratio, ratio_definition, goal, met, details);
a section whose `measure` also takes `repeats` gets --repeats. `--quick` is CI's smoke: tiny
sizes, the same code paths. A section that cannot be imported is named in the output as missing;
one that fails makes the exit status 1. `--sections` re-measures some sections only: the
report keeps the other rows of the existing report, saying when and how they were measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import math
import os
import platform
import re
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

SECTIONS = ("training", "evaluation", "validation", "engines", "serve", "startup", "batch_predict")
KEYS = ("measure", "unit", "ours", "baseline", "baseline_name", "ratio", "ratio_definition")
KEYS += ("goal", "met", "details")
PACKAGES = ("torch", "torchvision", "mmcv", "mmengine", "mmdet", "numpy", "determined")
PACKAGES += ("pycocotools", "hotcoco")
KEPT_MARK = "(kept: measured"  # in the details of a row a partial run did not re-measure


def run_section(name: str, quick: bool, repeats: int | None) -> tuple[list[dict], str | None]:
    """The section's rows, or no rows and why (missing or failed)."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"bench.{name}":
            return [], f"missing: bench/{name}.py does not exist"
        return [], f"missing: bench/{name}.py cannot be imported ({err})"
    kwargs = {}
    if repeats is not None and "repeats" in inspect.signature(module.measure).parameters:
        kwargs["repeats"] = repeats
    try:
        rows = module.measure(quick, **kwargs)
    except Exception:
        return [], "failed:\n" + traceback.format_exc()
    for row in rows:
        lacking = [key for key in KEYS if key not in row]
        numbers = [row.get(key) for key in ("ours", "baseline", "ratio")]
        if lacking or not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers):
            return [], f"failed: a row lacks {lacking} or has non-finite figures: {row}"
    return rows, None


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in read_lines("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    mem_kb = next(
        (
            int(line.split()[1])
            for line in read_lines("/proc/meminfo")
            if line.startswith("MemTotal")
        ),
        0,
    )
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": f"{mem_kb / 1024**2:.1f} GiB" if mem_kb else "unknown",
        "GPU": gpu(),
        "OS": platform.platform(),
        "Python": platform.python_version(),
    }


def gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none (the runs use the CPU)"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def versions() -> str:
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| measure | ours | baseline | unit | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['measure']} | {row['ours']:.4g} | {row['baseline']:.4g} | {row['unit']} | "
            f"{row['ratio']:.3f} | {row['goal']} | {'yes' if row['met'] else 'NO'} |"
        )
    return lines


def previous_rows(path: Path) -> tuple[list[dict], str]:
    """The rows of an earlier report (table and details), and when and how it measured them."""
    lines = path.read_text().splitlines() if path.is_file() else []
    rows, measured = [], {}
    details = {}
    for line in lines:
        found = re.match(r"- \*\*(.+?)\*\* \(baseline: (.+?); ratio = (.+?)\): (.*)$", line)
        if found:
            details[found[1]] = found.groups()[1:]
        for key in ("command", "date"):
            if line.startswith(f"- {key}: "):
                measured[key] = line.removeprefix(f"- {key}: ")
    for line in lines:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 7 or cells[0] in ("measure", "---"):
            continue
        baseline_name, ratio_definition, text = details.get(cells[0], ("", "", ""))
        rows.append({
            "measure": cells[0], "ours": float(cells[1]), "baseline": float(cells[2]),
            "unit": cells[3], "ratio": float(cells[4]), "goal": cells[5],
            "met": cells[6] == "yes", "baseline_name": baseline_name,
            "ratio_definition": ratio_definition, "details": text,
        })  # fmt: skip
    return rows, f"{measured.get('date', '?')} with {measured.get('command', '?')}"


def merged(kept: list[dict], measured: str, rows: list[dict]) -> list[dict]:
    """The kept rows, each saying when it was measured, with the re-measured ones in their
    place; new rows at the end."""
    new = {row["measure"]: row for row in rows}
    result = []
    for row in kept:
        if row["measure"] in new:
            result.append(new.pop(row["measure"]))
        elif KEPT_MARK in row["details"]:  # kept already: its own date stays
            result.append(row)
        else:
            result.append({**row, "details": f"{row['details']} {KEPT_MARK} {measured})"})
    return result + list(new.values())


def report(
    command: str,
    started: datetime.datetime,
    seconds: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    rows: list[dict],
    problems: dict[str, str],
    kept: str | None = None,
) -> str:
    lines = ["# Benchmarks", "", "Written by `bench/run.py`; do not edit by hand.", ""]
    lines += [f"- command: `{command}`", f"- date: {started:%Y-%m-%d %H:%M} UTC"]
    if kept:
        lines += [f"- {kept}"]  # the rows this command did not measure say when they were
    lines += [f"- {key}: {value}" for key, value in machine().items()]
    lines += [f"- versions: {versions()}"]
    lines += [
        f"- run time: {seconds / 60:.1f} min; load average before {load[0][0]:.2f}, "
        f"after {load[1][0]:.2f} (1 min)",
        "",
    ]
    lines += table(rows)
    lines += ["", "## Details", ""]
    for row in rows:
        lines += [
            f"- **{row['measure']}** (baseline: {row['baseline_name']}; ratio = "
            f"{row['ratio_definition']}): {row['details']}"
        ]
    for name, problem in problems.items():
        lines += ["", f"## Section `{name}`: {problem.splitlines()[0]}", ""]
        if len(problem.splitlines()) > 1:
            lines += ["```", *problem.splitlines()[1:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny sizes, seconds")
    parser.add_argument(
        "--repeats", type=int, help="repetitions per measure (sections that take it)"
    )
    parser.add_argument("--out", default="docs/benchmarks.md", help="the Markdown report")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        help="measure these sections only; the other rows are kept from the existing report",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

    started, clock, load_before = (
        datetime.datetime.now(datetime.UTC),
        time.monotonic(),
        os.getloadavg(),
    )
    rows: list[dict[str, Any]] = []
    problems: dict[str, str] = {}
    out = Path(args.out)
    kept_rows, measured, kept = [], "", None
    if args.sections:
        kept_rows, measured = previous_rows(out)
        if kept_rows:
            kept = f"sections measured: {', '.join(args.sections)}; the rows {KEPT_MARK} ...) "
            kept += "are kept from an earlier report"
    for name in args.sections or SECTIONS:
        print(f"== section {name}", flush=True)
        section_rows, problem = run_section(name, args.quick, args.repeats)
        rows += section_rows
        if problem:
            problems[name] = problem
            print(f"section {name}: {problem}", flush=True)
    command = " ".join(["python -m bench.run", *argv])
    rows = merged(kept_rows, measured, rows)
    load = (load_before, os.getloadavg())
    text = report(command, started, time.monotonic() - clock, load, rows, problems, kept)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n".join(table(rows)))
    for name, problem in problems.items():
        print(f"section {name}: {problem.splitlines()[0]}")
    print(f"Report: {out}")
    return 1 if any(p.startswith("failed") for p in problems.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
