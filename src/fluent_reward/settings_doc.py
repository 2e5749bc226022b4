"""The settings' documentation, generated from config.py: Markdown tables of key, type and meaning.

Each setting's ``Field(description=...)`` and bounds are the one source; the docs hold generated copies between
markers, ``<!-- settings:train -->`` ... ``<!-- /settings:train -->``, which ``fluent-reward params --write-docs``
refreshes and ``--check`` (and a test) compares. Values are not in the tables: they live in params.yaml alone, so a
project that changes its settings never makes its docs check fail.

Example::

    >>> from fluent_reward.config import EvaluateConfig
    >>> settings_table(EvaluateConfig).splitlines()[2]
    '| `min_gap` | number ≥ 0 | pairs whose judge overall scores differ by less are not ordered pairs |'
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel

from fluent_reward.config import Params
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import atomic_open

_BLOCK = re.compile(r"(<!-- settings:(?P<section>[\w.]+) -->\n)(?P<body>.*?)(<!-- /settings:(?P=section) -->)", re.S)
_BOUNDS = ((annotated_types.Gt, ">"), (annotated_types.Ge, "≥"), (annotated_types.Lt, "<"), (annotated_types.Le, "≤"))


def _type_text(annotation: Any, metadata: list[Any]) -> str:
    """``integer ≥ 1``, ``number > 0 or null``, ```no` | `fp16```..., readable in a table cell."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        parts = [_type_text(arg, metadata) for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in get_args(annotation) else "")
    if origin is list:
        return f"list of {_type_text(get_args(annotation)[0], [])}s"
    if origin is dict:
        return "mapping"
    names = {bool: "true/false", int: "integer", float: "number", str: "text", Path: "path"}
    text = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds = [
        f"{sign} {getattr(item, kind.__name__.lower()):g}"
        for kind, sign in _BOUNDS
        for item in metadata
        if isinstance(item, kind)
    ]
    return " ".join([text, ", ".join(bounds)]) if bounds else text


def settings_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, meaning) for every setting of ``model``, nested sections flattened as ``split.train``."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += settings_rows(annotation, key + ".")
        else:
            rows.append((key, _type_text(annotation, field.metadata), field.description or ""))
    return rows


def section_model(section: str) -> type[BaseModel]:
    """The config model of a top-level section (``train``, ``validate``, ``rubric``, ...)."""
    for name, field in Params.model_fields.items():
        if section in (name, field.alias):
            return field.annotation
    raise FluentRewardError(f"no settings section '{section}' (sections: {', '.join(section_names())})")


def section_names() -> list[str]:
    return [field.alias or name for name, field in Params.model_fields.items()]


def settings_table(model: type[BaseModel]) -> str:
    lines = ["| key | type | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {kind} | {meaning} |" for key, kind, meaning in settings_rows(model)]
    return "\n".join(lines) + "\n"


def refresh_blocks(text: str) -> str:
    """``text`` with every settings block regenerated from config.py."""
    return _BLOCK.sub(lambda m: m.group(1) + settings_table(section_model(m["section"])) + m.group(4), text)


def stale_docs(paths: list[Path], write: bool = False) -> list[Path]:
    """The files among ``paths`` whose settings blocks differ from config.py (rewritten when ``write``)."""
    stale = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        fresh = refresh_blocks(text)
        if fresh != text:
            stale.append(path)
            if write:
                with atomic_open(path) as handle:
                    handle.write(fresh)
    return stale
