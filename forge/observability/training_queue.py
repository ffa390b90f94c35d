"""The training queue as ``forge status`` and ``forge watch`` show it: the requests
waiting in each priority lane, and those a worker holds (running, or waiting for GPU
memory), each with its priority and how long ago it was queued.

Everything is a read (XINFO GROUPS, XRANGE, XPENDING, GET, TIME), so showing it cannot
disturb a deployment; times are Redis's clock against entry ids, never the local one.
A lane's queued entries are those after its group's last-delivered id; held ones are
its pending entries. A training waiting for GPU memory has a short-lived record
(``Keys.admission_wait``) its worker refreshes while it waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import redis

from forge.events import EVENT_FIELD
from forge.keys import PRIORITIES, Keys, Priority

State = Literal["queued", "running", "waiting for GPU"]

_MiB = 2**20


@dataclass(frozen=True, slots=True)
class QueuedTraining:
    """One training request in the queue."""

    priority: Priority
    state: State
    event_id: str
    model: str
    entry_id: str
    waiting_s: float  # since it was queued (its entry arrived)
    worker: str = ""
    deliveries: int = 0
    detail: str = ""  # why it waits for a GPU: its need and the free memory


@dataclass(frozen=True, slots=True)
class TrainingQueue:
    """Held (running or waiting for GPU) first, then queued; each best priority
    first, then longest waiting. ``queued`` counts every queued request by priority,
    also those beyond the ``limit`` listed."""

    trainings: list[QueuedTraining] = field(default_factory=list)
    queued: dict[str, int] = field(default_factory=dict)


class _Brief(msgspec.Struct):
    id: str = "?"
    model: str = "?"


class _Waiting(msgspec.Struct):
    need_bytes: int = 0
    free_bytes: int = 0
    gpus: int = 0


_brief = msgspec.json.Decoder(_Brief)
_waiting = msgspec.json.Decoder(_Waiting)


def training_queue(client: redis.Redis, keys: Keys, limit: int = 20) -> TrainingQueue:
    """The queue of ``training-requests``, at most ``limit`` entries of each lane and
    state listed."""
    now_s = _server_time_s(client)
    trainings: list[QueuedTraining] = []
    counts: dict[str, int] = {}
    for priority in PRIORITIES:
        counts[priority] = 0
        # Each partition's lane of this priority.
        for part in keys.parts:
            lane = keys.lane(part.training_requests, priority)
            position, lag = _group_position(client, keys, lane)
            if position is None:
                continue
            held = _held(client, keys, lane, priority, now_s, limit)
            queued = _queued(client, lane, position, priority, now_s, limit)
            counts[priority] += lag if lag is not None else len(queued)
            trainings.extend(held + queued)
    order = {"running": 0, "waiting for GPU": 0, "queued": 1}
    trainings.sort(key=lambda t: (order[t.state], PRIORITIES.index(t.priority), -t.waiting_s))
    return TrainingQueue(trainings, counts)


def _server_time_s(client: redis.Redis) -> float:
    reply: Any = client.time()
    return int(reply[0]) + int(reply[1]) / 1_000_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _arrived_s(entry_id: str) -> float:
    return int(entry_id.split("-", 1)[0]) / 1000


def _group_position(client: redis.Redis, keys: Keys, lane: str) -> tuple[str | None, int | None]:
    """The group's last-delivered id on ``lane`` (None: no group yet) and its lag."""
    try:
        groups: Any = client.xinfo_groups(lane)
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None, None
        raise
    group = next((g for g in groups if _text(g["name"]) == keys.group), None)
    if group is None:
        return None, None
    lag = group.get("lag")
    return _text(group["last-delivered-id"]), None if lag is None else int(lag)


def _queued(
    client: redis.Redis, lane: str, position: str, priority: Priority, now_s: float, limit: int
) -> list[QueuedTraining]:
    entries: Any = client.xrange(lane, min=f"({position}", count=limit)
    out = []
    for entry_id, fields in entries:
        eid = _text(entry_id)
        brief = _decoded(fields)
        out.append(
            QueuedTraining(priority, "queued", brief.id, brief.model, eid, now_s - _arrived_s(eid))
        )
    return out


def _held(
    client: redis.Redis, keys: Keys, lane: str, priority: Priority, now_s: float, limit: int
) -> list[QueuedTraining]:
    pending: Any = client.xpending_range(lane, keys.group, "-", "+", limit)
    if not pending:
        return []
    ids = [_text(p["message_id"]) for p in pending]
    pipe = client.pipeline(transaction=False)
    for eid in ids:
        pipe.xrange(lane, min=eid, max=eid, count=1)
        pipe.get(keys.admission_wait(lane, eid))
    replies = pipe.execute()
    out = []
    for index, (info, eid) in enumerate(zip(pending, ids, strict=True)):
        entries, waiting = replies[2 * index], replies[2 * index + 1]
        brief = _decoded(entries[0][1]) if entries else _Brief()
        state: State = "running" if waiting is None else "waiting for GPU"
        out.append(
            QueuedTraining(
                priority,
                state,
                brief.id,
                brief.model,
                eid,
                now_s - _arrived_s(eid),
                worker=_text(info["consumer"]),
                deliveries=int(info["times_delivered"]),
                detail="" if waiting is None else _wait_detail(waiting),
            )
        )
    return out


def _decoded(fields: dict[bytes, bytes] | None) -> _Brief:
    try:
        return _brief.decode((fields or {}).get(EVENT_FIELD, b""))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Brief()


def _wait_detail(raw: bytes) -> str:
    try:
        wait = _waiting.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
    return (
        f"needs {wait.need_bytes / _MiB:.0f} MiB, most free on {wait.gpus} GPU(s): "
        f"{wait.free_bytes / _MiB:.0f} MiB"
    )
