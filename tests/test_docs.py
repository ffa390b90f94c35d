"""Generated docs match the code; hand-written docs agree with the event contracts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from forge.cli.cmd_docs import drift
from forge.contracts.asyncapi import document
from forge.contracts.configdoc import DESCRIPTIONS
from forge.contracts.schemas import event_schemas
from forge.events import ALL_EVENTS, decode_as, event_type_for, event_type_name
from forge.keys import Keys
from forge.settings import ENV_VARS, Settings
from tests.support.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


# ---------------------------------------------------------------------- generated


def test_generated_docs_match_the_code() -> None:
    assert drift(DOCS) == [], "run 'forge docs export' and commit the result"


def test_docs_export_and_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "docs", "export", "--dir", str(tmp_path), "--check")
    assert code == 1
    assert "asyncapi.yaml, configuration.md" in err
    code, out, _ = run_cli(capsys, "docs", "export", "--dir", str(tmp_path))
    assert code == 0
    assert out.splitlines() == [str(tmp_path / "asyncapi.yaml"), str(tmp_path / "configuration.md")]
    code, out, _ = run_cli(capsys, "docs", "export", "--dir", str(tmp_path), "--check")
    assert (code, out) == (0, "docs up to date\n")


# ---------------------------------------------------------------------- AsyncAPI


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    return loaded


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict), ref
        assert part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in all_refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in all_refs(value)]
    return []


def test_asyncapi_is_a_3_1_document_of_every_stream(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.1.0"
    assert asyncapi["info"]["title"] == "Forge"
    addresses = [channel["address"] for channel in asyncapi["channels"].values()]
    keys = Keys()
    assert sorted(addresses) == sorted({*keys.input_streams, *keys.output_streams})


def test_asyncapi_round_trips_the_generator(asyncapi: dict[str, Any]) -> None:
    assert asyncapi == document()


def test_every_ref_resolves(asyncapi: dict[str, Any]) -> None:
    refs = all_refs(asyncapi)
    assert len(refs) > 20
    for ref in refs:
        resolve(asyncapi, ref)


def test_channel_messages_carry_their_event_schema(asyncapi: dict[str, Any]) -> None:
    for name, channel in asyncapi["channels"].items():
        assert channel["messages"], name
        for message_ref in channel["messages"].values():
            message = resolve(asyncapi, message_ref["$ref"])
            assert message["contentType"] == "application/json"
            schema = resolve(asyncapi, message["payload"]["$ref"])
            assert schema["properties"]["type"]["enum"] == [message["name"]]


def test_operations_use_their_channels_messages(asyncapi: dict[str, Any]) -> None:
    keys = Keys()
    actions = {}
    for operation in asyncapi["operations"].values():
        channel = resolve(asyncapi, operation["channel"]["$ref"])
        actions[channel["address"]] = operation["action"]
        for message in operation["messages"]:
            channel_ref = operation["channel"]["$ref"]
            assert message["$ref"].startswith(f"{channel_ref}/messages/")
            resolve(asyncapi, message["$ref"])
    assert actions == {
        **dict.fromkeys(keys.input_streams, "receive"),
        **dict.fromkeys(keys.output_streams, "send"),
    }


def test_asyncapi_schemas_are_the_json_schemas(asyncapi: dict[str, Any]) -> None:
    """The same msgspec types produce both, so schemas/ and the AsyncAPI cannot differ."""
    components = asyncapi["components"]["schemas"]
    for cls in ALL_EVENTS:
        file_doc = event_schemas()[f"{event_type_name(cls)}.schema.json"]
        as_components = json.loads(
            json.dumps(file_doc["$defs"]).replace("#/$defs/", "#/components/schemas/")
        )
        for name, schema in as_components.items():
            assert components[name] == schema, name


# ---------------------------------------------------------------------- configuration


def test_every_setting_has_a_description() -> None:
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    assert set(DESCRIPTIONS) == fields
    assert all(text and "\n" not in text and "|" not in text for text in DESCRIPTIONS.values())


def test_configuration_page_lists_every_variable() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for var in ENV_VARS:
        assert f"`{var}`" in text, var


# ---------------------------------------------------------------------- hand-written pages


def json_blocks(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)]


def test_every_example_in_events_md_is_a_valid_event() -> None:
    examples = [b for b in json_blocks(DOCS / "events.md") if isinstance(b, dict) and "type" in b]
    seen = set()
    for example in examples:
        # Decoded exactly as a worker decodes an entry: raises on any contract violation.
        decode_as(event_type_for(example["type"]), json.dumps(example))
        seen.add(example["type"])
    assert seen == {event_type_name(cls) for cls in ALL_EVENTS}


def test_architecture_shows_every_stream() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    assert "```mermaid" in text
    keys = Keys()
    for stream in (*keys.input_streams, *keys.output_streams):
        assert stream in text, stream


HAND_WRITTEN = ("architecture.md", "events.md", "operations.md")


def test_docs_link_to_files_that_exist() -> None:
    for page in (DOCS / name for name in (*HAND_WRITTEN, "configuration.md")):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
