"""Checks JSON values against botocore shapes, strictly: types, required, unknown members, lengths,
ranges, patterns and enums.

botocore's own ParamValidator checks only what a client needs (no patterns, no max, no enums) and
never looks at outputs, so the control plane walks the model itself. Requests that don't fit are the
caller's fault (ValidationException with a fieldList); responses that don't fit are a bug of ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from botocore.model import Shape


@dataclass(frozen=True)
class FieldProblem:
    path: str
    message: str


@lru_cache(maxsize=512)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f"'{value}'"
    return text if len(text) <= 80 else text[:77] + "..."


def check_shape(shape: Shape, value: Any, path: str = "", *, skip_non_body: bool = True) -> list[FieldProblem]:
    """Every way `value` fails to fit `shape`, with AWS-style messages (empty list = fits).

    Smithy patterns are not anchored, so `re.search` as AWS does; our own patterns carry ^...$.
    Members bound to headers or the URI are not part of a JSON body and are skipped.
    """
    problems: list[FieldProblem] = []
    _walk(shape, value, path, problems, skip_non_body)
    return problems


def _constraint(problems: list[FieldProblem], path: str, value: Any, text: str) -> None:
    where = path or "body"
    problems.append(FieldProblem(where, f"Value {_show(value)} at '{where}' failed to satisfy constraint: {text}"))


def _walk(shape: Shape, value: Any, path: str, problems: list[FieldProblem], skip_non_body: bool) -> None:
    t = shape.type_name
    meta = shape.metadata
    if t == "structure":
        if not isinstance(value, dict):
            _constraint(problems, path, value, "Member must be an object")
            return
        members = shape.members
        for name in shape.required_members:
            if value.get(name) is None and not (skip_non_body and members[name].serialization.get("location")):
                _constraint(problems, _join(path, name), None, "Member must not be null")
        for name, item in value.items():
            if name not in members:
                problems.append(FieldProblem(_join(path, name), f"Unknown member '{_join(path, name)}'"))
                continue
            if item is None:
                continue
            if skip_non_body and members[name].serialization.get("location"):
                continue
            _walk(members[name], item, _join(path, name), problems, skip_non_body)
    elif t == "list":
        if not isinstance(value, list):
            _constraint(problems, path, value, "Member must be a list")
            return
        _length(problems, path, value, meta, "Member must have length")
        for index, item in enumerate(value):
            _walk(shape.member, item, f"{path}.{index + 1}" if path else str(index + 1), problems, skip_non_body)
    elif t == "map":
        if not isinstance(value, dict):
            _constraint(problems, path, value, "Member must be a map")
            return
        _length(problems, path, value, meta, "Member must have length")
        for key, item in value.items():
            _walk(shape.key, key, f"{path}.key", problems, skip_non_body)
            _walk(shape.value, item, f"{path}.{key}", problems, skip_non_body)
    elif t == "string":
        if not isinstance(value, str):
            _constraint(problems, path, value, "Member must be a string")
            return
        _length(problems, path, value, meta, "Member must have length")
        if shape.enum and value not in shape.enum:
            _constraint(problems, path, value, f"Member must satisfy enum value set: [{', '.join(shape.enum)}]")
        if "pattern" in meta and not _regex(meta["pattern"]).search(value):
            _constraint(problems, path, value, f"Member must satisfy regular expression pattern: {meta['pattern']}")
    elif t in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            _constraint(problems, path, value, "Member must be an integer")
            return
        _range(problems, path, value, meta)
    elif t in ("double", "float"):
        if not isinstance(value, int | float) or isinstance(value, bool):
            _constraint(problems, path, value, "Member must be a number")
            return
        _range(problems, path, value, meta)
    elif t == "boolean":
        if not isinstance(value, bool):
            _constraint(problems, path, value, "Member must be a boolean")
    elif t == "timestamp":
        if not isinstance(value, int | float | str) or isinstance(value, bool):
            _constraint(problems, path, value, "Member must be a timestamp")
    elif t == "blob":
        if not isinstance(value, str):
            _constraint(problems, path, value, "Member must be base64 text")
    else:  # a shape type this checker does not know is a bug here, not in the caller
        raise TypeError(f"unsupported shape type {t!r} at {path or 'body'}")


def _length(problems: list[FieldProblem], path: str, value: Any, meta: dict[str, Any], what: str) -> None:
    if "min" in meta and len(value) < meta["min"]:
        _constraint(problems, path, value, f"{what} greater than or equal to {meta['min']}")
    if "max" in meta and len(value) > meta["max"]:
        _constraint(problems, path, value, f"{what} less than or equal to {meta['max']}")


def _range(problems: list[FieldProblem], path: str, value: float, meta: dict[str, Any]) -> None:
    if "min" in meta and value < meta["min"]:
        _constraint(problems, path, value, f"Member must have value greater than or equal to {meta['min']}")
    if "max" in meta and value > meta["max"]:
        _constraint(problems, path, value, f"Member must have value less than or equal to {meta['max']}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def summary(problems: list[FieldProblem]) -> str:
    """AWS's message form: 'N validation error(s) detected: ...; ...'."""
    count = len(problems)
    noun = "error" if count == 1 else "errors"
    return f"{count} validation {noun} detected: " + "; ".join(p.message for p in problems)
