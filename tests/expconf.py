"""Validate Determined experiment configs against Determined's own expconf v0 JSON Schemas.

The schemas are draft-07 plus Determined's extension keywords. Validation has two phases, as on
the master: *sanity* checks what a user submits; *completeness* also enforces the requirements
that cluster defaults may satisfy (`eventuallyRequired`, `eventually`).
"""

from __future__ import annotations

import functools
import json
import posixpath
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator, ValidationError
from jsonschema.validators import extend
from referencing import Registry
from referencing.jsonschema import DRAFT7

# Not part of this repo: CI clones the repo with `shared/` beside it.
EXPCONF_DIR = Path(__file__).resolve().parents[2] / "shared" / "determined-expconf"
EXPERIMENT_URL = "http://determined.ai/schemas/expconf/v0/experiment.json"

Keyword = Callable[[Any, Any, Any, dict], Iterator[ValidationError]]


def _union_key_matches(key: str | None, instance: Any) -> bool:
    """Whether a union item's `unionKey` says the instance was meant to be that item."""
    if key in (None, "never"):
        return False
    if key == "always":
        return True
    kind, _, arg = key.partition(":")
    is_object = isinstance(instance, dict)
    if kind == "not":
        return not _union_key_matches(arg, instance)
    if kind == "const":
        name, _, value = arg.partition("=")
        return is_object and instance.get(name) == value
    if kind == "singleproperty":
        return is_object and list(instance) == [arg]
    if kind == "hasattr":
        return is_object and arg in instance
    if kind == "type":
        return isinstance(instance, {"object": dict, "array": list}[arg])
    raise ValueError(f"unknown unionKey {key!r}")


def _union(validator: Any, union: dict, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """oneOf, but report the errors of the item the instance was meant to be."""
    valid, chosen = 0, None
    for index, item in enumerate(union["items"]):
        errors = list(validator.descend(instance, item, schema_path=index))
        if not errors:
            valid += 1
        elif chosen is None and _union_key_matches(item.get("unionKey"), instance):
            chosen = errors
    if valid == 1:
        return
    if valid > 1:  # The items are meant to be exclusive: this is a schema bug, not a user error.
        yield ValidationError(f"matches {valid} alternatives of a union; expected exactly one")
    elif chosen:
        yield from chosen
    else:
        yield ValidationError(union.get("defaultMessage", "matches none of the allowed forms"))


def _optional_ref(
    validator: Any, ref: str, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    """`$ref`, except that null is always accepted."""
    if instance is not None:
        yield from validator.descend(instance, {"$ref": ref}, schema_path="optionalRef")


def _checks(validator: Any, checks: dict, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """Each subschema must hold; a failure reports only the check's own message."""
    for message, subschema in checks.items():
        if next(validator.descend(instance, subschema), None) is not None:
            yield ValidationError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_subdir(path: str, parent: str) -> bool:
    """Whether `path` stays inside `parent` (relative paths are taken relative to it)."""
    path = posixpath.normpath(path)
    if not posixpath.isabs(path):
        return path != ".." and not path.startswith("../")
    parent = posixpath.normpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _compare_properties(
    validator: Any, compare: dict, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    """Compare two (dotted-path) properties; skipped when either is unset."""
    if not isinstance(instance, dict):
        return

    def lookup(dotted: str) -> Any:
        value = instance
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value

    a_name, b_name, kind = compare["a"], compare["b"], compare["type"]
    a, b = lookup(a_name), lookup(b_name)
    if kind in ("a<b", "a<=b"):
        # Wrong types are reported by `type`; comparing them here would raise TypeError.
        if not (_is_number(a) and _is_number(b)):
            return
        if kind == "a<b" and a >= b:
            yield ValidationError(f"{a_name} must be less than {b_name} ({a} >= {b})")
        elif kind == "a<=b" and a > b:
            yield ValidationError(f"{a_name} must be less than {b_name} or equal to it ({a} > {b})")
    elif kind == "a_is_subdir_of_b":
        if isinstance(a, str) and isinstance(b, str) and not _is_subdir(a, b):
            yield ValidationError(f"{a_name} must be a subdirectory of {b_name}")
    else:
        raise ValueError(f"unknown compareProperties type {kind!r}")


def _disallow_properties(
    validator: Any, disallowed: dict, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    """Reject the named properties, each with its own message."""
    if isinstance(instance, dict):
        for name in instance:
            if name in disallowed:
                yield ValidationError(f"{name}: {disallowed[name]}")


def _eventually_required(
    validator: Any, required: list, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    if isinstance(instance, dict):
        for name in required:
            if name not in instance:
                yield ValidationError(f"{name} is a required property")


def _eventually(
    validator: Any, inner: dict, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    yield from validator.descend(instance, inner, schema_path="eventually")


_SANITY: dict[str, Keyword] = {
    "union": _union,
    "optionalRef": _optional_ref,
    "checks": _checks,
    "compareProperties": _compare_properties,
    "disallowProperties": _disallow_properties,
}
# Unknown keywords are ignored, so leaving these two out is what defers them to completeness.
_COMPLETENESS: dict[str, Keyword] = {
    **_SANITY,
    "eventuallyRequired": _eventually_required,
    "eventually": _eventually,
}
SanityValidator = extend(Draft7Validator, _SANITY)
CompletenessValidator = extend(Draft7Validator, _COMPLETENESS)


@functools.cache
def _load() -> tuple[dict[str, dict], Registry]:
    """All expconf v0 schemas by `$id`, and a `referencing` registry of them."""
    schemas = {}
    for path in sorted((EXPCONF_DIR / "expconf" / "v0").glob("*.json")):
        schema = json.loads(path.read_text())
        # With "$schema" present, jsonschema 4.x validates each `$ref`'d schema with the plain
        # Draft7Validator named there, silently dropping the extension keywords.
        schema.pop("$schema", None)
        schemas[schema["$id"]] = schema
    if not schemas:
        raise FileNotFoundError(f"no expconf schemas under {EXPCONF_DIR}")
    # Draft 7 is stated here since "$schema" no longer says it.
    resources = [(url, DRAFT7.create_resource(schema)) for url, schema in schemas.items()]
    return schemas, Registry().with_resources(resources).crawl()


def _errors(cls: type, config: Any, schema_url: str) -> list[str]:
    schemas, registry = _load()
    errors = cls(schemas[schema_url], registry=registry).iter_errors(config)
    lines = []
    for error in sorted(errors, key=lambda e: [str(part) for part in e.absolute_path]):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        lines.append(f"<config>{path}: {error.message}")
    return lines


def sanity_errors(config: Any, schema_url: str = EXPERIMENT_URL) -> list[str]:
    """Errors in a config as submitted, as `<config>.path[i]: message`; empty when it is sane."""
    return _errors(SanityValidator, config, schema_url)


def completeness_errors(config: Any, schema_url: str = EXPERIMENT_URL) -> list[str]:
    """Like `sanity_errors`, plus what must eventually be set (by the user or cluster defaults)."""
    return _errors(CompletenessValidator, config, schema_url)
