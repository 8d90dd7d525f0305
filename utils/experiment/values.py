"""Rules on single values of a Determined experiment config (types, ranges, sizes), the check
of one mapping's keys against its rules, and the `resources` section: the pieces
`utils.experiment.rules` is built from."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

# A rule on one value: None when the value is accepted, else what the value must be.
Rule = Callable[[Any], str | None]

LENGTH_UNITS = ("batches", "records", "epochs")

# Determined's memory sizes: "16g", "1.5 GiB", "512MB", "100b", or a plain number of bytes.
MEMORY_SIZE = re.compile(r"^([0-9]*\.)?[0-9]+ ?([kmgtp](i?b)?|b)?$", re.IGNORECASE | re.ASCII)
# `--device` strings: "/dev/host:/dev/container[:rwm]".
DEVICE_STRING = re.compile(r"/[^:]*:/")


def is_int(value: Any) -> bool:
    """An integer as JSON reads one: 3 or 3.0, never a boolean."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(minimum: int | None = None, maximum: int | None = None, null: bool = True) -> Rule:
    bounds = (
        f" from {minimum} to {maximum}"
        if minimum is not None and maximum is not None
        else f" >= {minimum}"
        if minimum is not None
        else ""
    )

    def rule(value: Any) -> str | None:
        if value is None and null:
            return None
        if not is_int(value) or (minimum is not None and value < minimum):
            return f"an integer{bounds}"
        if maximum is not None and value > maximum:
            return f"an integer{bounds}"
        return None

    return rule


def number(above: float | None = None, null: bool = True) -> Rule:
    def rule(value: Any) -> str | None:
        if value is None and null:
            return None
        if not is_number(value) or (above is not None and value <= above):
            return "a number" + (f" above {above:g}" if above is not None else "")
        return None

    return rule


def string(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "a string"


def boolean(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else "true or false"


def one_of(*choices: Any) -> Rule:
    def rule(value: Any) -> str | None:
        if any(value == c and type(value) is type(c) for c in choices):
            return None
        return "one of " + ", ".join("null" if c is None else str(c) for c in choices)

    return rule


def integer_list(value: Any) -> str | None:
    if value is None or (isinstance(value, list) and all(is_int(v) for v in value)):
        return None
    return "a list of integers"


def length(minimum: int, integers: bool = False) -> Rule:
    """A training length `{batches|records|epochs: N}` with N >= `minimum`; with `integers`, a
    bare integer >= 0 too (the searchers' unitless `max_length`)."""
    what = f"a length like {{batches: N}} or {{epochs: N}} with N >= {minimum}" + (
        ", or an integer >= 0" if integers else ""
    )

    def rule(value: Any) -> str | None:
        if value is None:
            return None
        if integers and not isinstance(value, dict):
            return None if is_int(value) and value >= 0 else what
        if not isinstance(value, dict) or len(value) != 1:
            return what
        ((unit, count),) = value.items()
        if unit not in LENGTH_UNITS or not is_int(count) or count < minimum:
            return what
        return None

    return rule


def anything(value: Any) -> str | None:
    return None


def close_match(name: Any, options: Any) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f"; did you mean {close[0]}?" if close else ""


def mapping_problems(
    section: dict[str, Any], rules: dict[str, Rule], where: str, owner: str
) -> list[str]:
    """Unknown keys of `section`, and values that break their rule."""
    problems = []
    for key, value in section.items():
        rule = rules.get(key)
        if rule is None:
            problems.append(
                f"{where}.{key} is not a key of {owner}{close_match(key, rules)} "
                f"(keys: {', '.join(rules)})."
            )
            continue
        what = rule(value)
        if what:
            problems.append(f"{where}.{key} is {value!r}: use {what}.")
    return problems


def devices(value: Any) -> str | None:
    what = 'a list of "/host:/container[:mode]" strings or {host_path, container_path, mode}'
    if value is None:
        return None
    if not isinstance(value, list):
        return what
    for device in value:
        if isinstance(device, str):
            if not DEVICE_STRING.match(device):
                return what
        elif isinstance(device, dict):
            keys = {"host_path", "container_path", "mode"}
            if set(device) - keys or not {"host_path", "container_path"} <= set(device):
                return what
            paths = (device["host_path"], device["container_path"])
            if not all(isinstance(p, str) for p in paths) or string(device.get("mode")):
                return what
        else:
            return what
    return None


def memory_size(value: Any) -> str | None:
    if value is None or is_int(value) or (isinstance(value, str) and MEMORY_SIZE.search(value)):
        return None
    return "a memory size: bytes, or a string like 16g, 1.5GiB or 512MB"


# Resources.

RESOURCES_RULES: dict[str, Rule] = {
    "slots_per_trial": integer(0),
    "max_slots": integer(),
    "slots": integer(),
    "weight": number(),
    "priority": integer(1, 99),
    "resource_pool": string,
    "shm_size": memory_size,
    "devices": devices,
    "is_single_node": boolean,
    "native_parallel": boolean,
    "agent_label": string,
}


def resources_problems(resources: Any) -> list[str]:
    """What the master's first check rejects in the `resources` section."""
    if resources is None:
        return []
    if not isinstance(resources, dict):
        return [f"resources is {resources!r}: write a mapping, e.g. {{slots_per_trial: 1}}."]
    return mapping_problems(resources, RESOURCES_RULES, "resources", "resources")
