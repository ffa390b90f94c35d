"""JSON Schema for every event type, generated from the msgspec types in forge.events."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from forge.contracts import generated
from forge.events import ALL_EVENTS, Event, event_type_name

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _normalised(node: Any) -> Any:
    """``node`` with every description put through ``inspect.cleandoc``.

    Descriptions come from docstrings, and msgspec releases strip their indentation
    differently (0.23 dedents what 0.22 kept): the generated files must not change
    with the library's text handling.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _normalised(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_normalised(item) for item in node]
    return node


def schema_components(
    types: Iterable[type[Event]], ref_template: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """``msgspec.json.schema_components`` with normalised descriptions."""
    schemas, components = msgspec.json.schema_components(list(types), ref_template=ref_template)
    return _normalised(list(schemas)), _normalised(components)


def event_schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema document, one self-contained document per event type."""
    documents: dict[str, dict[str, Any]] = {}
    for cls in ALL_EVENTS:
        (schema,), components = schema_components([cls], ref_template="#/$defs/{name}")
        name = event_type_name(cls)
        documents[f"{name}.schema.json"] = {
            "$schema": SCHEMA_DIALECT,
            "title": name,
            **schema,
            "$defs": components,
        }
    return documents


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def schema_files() -> dict[str, Callable[[], str]]:
    """File name -> its text, for ``forge.contracts.generated``."""
    return {name: partial(render, document) for name, document in event_schemas().items()}


def export(directory: Path) -> list[Path]:
    """Write every schema into ``directory``; returns the files written."""
    return generated.write(directory, schema_files())


def drift(directory: Path) -> list[str]:
    """File names whose content differs from what the code generates (or is missing)."""
    return generated.stale(directory, schema_files())
