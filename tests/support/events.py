"""Input events for tests: build a new-data event and publish raw or encoded entries."""

from __future__ import annotations

import msgspec
import redis

from forge.events import EVENT_FIELD


def publish(client: redis.Redis, stream: str, event: dict[str, object] | bytes) -> str:
    """XADD ``event`` (a dict, JSON-encoded here, or raw bytes) and return its entry id."""
    payload = event if isinstance(event, bytes) else msgspec.json.encode(event)
    return client.xadd(stream, {EVENT_FIELD: payload}).decode()


def new_data(event_id: str, n: int = 1, collection: str = "tickets") -> dict[str, object]:
    """A new-data event with ``n`` text records."""
    return {
        "type": "new-data",
        "id": event_id,
        "collection": collection,
        "records": [{"id": f"{event_id}-r{i}", "text": f"text {i}"} for i in range(n)],
    }
