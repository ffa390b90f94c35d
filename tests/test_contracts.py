"""The JSON Schemas say what Forge does: what they accept, Forge decodes, and back.

Producers in other languages validate against ``schemas/`` before they publish; an
event the schema accepts but Forge dead-letters at once is a broken contract.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from forge.contracts import schemas
from forge.contracts.asyncapi import render_yaml
from forge.errors import InvalidEvent
from forge.events import NewData, decode_as

REPO = Path(__file__).resolve().parents[1]


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((REPO / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def _new_data(record: dict[str, Any], **event: Any) -> dict[str, Any]:
    return {"type": "new-data", "id": "e1", "collection": "c", "records": [record], **event}


def _forge_accepts(event: dict[str, Any]) -> bool:
    try:
        decode_as(NewData, msgspec.json.encode(event))
    except InvalidEvent:
        return False
    return True


CASES = [
    pytest.param(_new_data({"id": "r1", "text": "hello"}), id="text"),
    pytest.param(_new_data({"id": "r1", "vector": [0.1, 0.2]}), id="vector"),
    pytest.param(_new_data({"id": "r1", "deleted": True}), id="deleted"),
    pytest.param(_new_data({"id": "r1"}), id="only-an-id"),
    pytest.param(_new_data({"id": "r1", "text": None}), id="null-text"),
    pytest.param(_new_data({"id": "r1", "deleted": False}), id="not-deleted-no-content"),
    pytest.param(_new_data({"id": "r1", "text": "x"}, created_at="yesterday"), id="yesterday"),
    pytest.param(_new_data({"id": "r1", "text": "x"}, created_at="2026-12-01"), id="date-only"),
    pytest.param(
        _new_data({"id": "r1", "text": "x"}, created_at="2026-12-01T10:00:00Z"), id="utc-time"
    ),
    pytest.param(
        _new_data({"id": "r1", "text": "x"}, created_at="2026-12-01 10:00:00.25+01:00"),
        id="offset-time",
    ),
    pytest.param(
        _new_data({"id": "r1", "text": "x"}, created_at="2026-12-01T10:00:00"), id="naive-time"
    ),
    pytest.param(
        _new_data({"id": "r1", "text": "x"}, created_at="2026-12-01T25:00:00Z"), id="hour-25"
    ),
]


@pytest.mark.parametrize("event", CASES)
def test_the_schema_accepts_exactly_what_forge_decodes(event: dict[str, Any]) -> None:
    schema_accepts = _validator("new-data").is_valid(event)
    assert schema_accepts == _forge_accepts(event)


def test_a_record_with_only_an_id_is_rejected_by_the_schema() -> None:
    assert not _validator("new-data").is_valid(_new_data({"id": "r1"}))


def test_created_at_is_a_date_time() -> None:
    created_at = json.loads((REPO / "schemas" / "new-data.schema.json").read_text())["$defs"][
        "NewData"
    ]["properties"]["created_at"]["anyOf"][0]
    assert created_at["format"] == "date-time"
    assert not _validator("new-data").is_valid(
        _new_data({"id": "r1", "text": "x"}, created_at="yesterday")
    )


def _indented_like_msgspec_0_22(real: Any) -> Any:
    """schema_components as msgspec 0.22 made it: docstring lines keep their indent."""

    def components(types: Any, ref_template: str) -> Any:
        out, defs = real(types, ref_template=ref_template)
        for component in defs.values():
            doc = component.get("description")
            if doc and "\n" in doc:
                head, *rest = doc.split("\n")
                indented = ("    " + line if line else line for line in rest)
                component["description"] = "\n".join([head, *indented])
        return out, defs

    return components


def test_generated_files_do_not_follow_msgspec_text_formatting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = (schemas.event_schemas(), render_yaml())
    monkeypatch.setattr(
        msgspec.json,
        "schema_components",
        _indented_like_msgspec_0_22(msgspec.json.schema_components),
    )
    assert (schemas.event_schemas(), render_yaml()) == expected
