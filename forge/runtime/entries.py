"""What the runtime moves between Redis and its handlers: delivered entries, the
settlement a batch ends with (and the settle script's arguments for it), and entry ids."""

from __future__ import annotations

from dataclasses import dataclass, field

from forge.events import EVENT_FIELD, Event, encode


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as delivered to this consumer."""

    stream: str
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def payload(self) -> bytes | None:
        return self.fields.get(EVENT_FIELD)

    @property
    def arrived_at_s(self) -> float:
        """When Redis appended the entry (the id's millisecond part), as a Unix time."""
        return int(self.entry_id.split("-", 1)[0]) / 1000


@dataclass(slots=True)
class Settlement:
    """Everything that finishes a batch, written in one atomic script call."""

    acks: dict[str, list[str]] = field(default_factory=dict)
    publishes: list[tuple[str, bytes]] = field(default_factory=list)
    writes: list[tuple[str, bytes, int]] = field(default_factory=list)

    def ack(self, stream: str, entry_id: str) -> None:
        self.acks.setdefault(stream, []).append(entry_id)

    def publish(self, stream: str, event: Event) -> None:
        self.publishes.append((stream, encode(event)))

    def write(self, key: str, value: bytes, ttl_s: int) -> None:
        """SET ``key`` with an expiry (idempotency markers, last errors)."""
        self.writes.append((key, value, ttl_s))

    def __bool__(self) -> bool:
        return bool(self.acks or self.publishes or self.writes)


_MAX_ID_PART = 2**64 - 1


def is_entry_id(text: str) -> bool:
    """Whether ``text`` is a full stream entry id, ``MILLISECONDS-SEQUENCE``.

    Stricter than Redis, which also takes ``-``, ``+`` and a bare millisecond time in
    ranges: one record means one exact id.
    """
    ms, sep, seq = text.partition("-")
    parts = (ms, seq)
    if not sep or not all(p.isascii() and p.isdigit() for p in parts):
        return False
    return all(int(p) <= _MAX_ID_PART for p in parts)


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def settle_call(
    settlement: Settlement, group: str, maxlen: int
) -> tuple[list[str], list[str | bytes | int]]:
    """The script's KEYS and ARGV for ``settlement``."""
    keys: list[str] = [stream for stream, _ in settlement.publishes]
    keys += [key for key, _, _ in settlement.writes]
    keys += list(settlement.acks)
    args: list[str | bytes | int] = [
        len(settlement.publishes),
        len(settlement.writes),
        len(settlement.acks),
        group,
        maxlen,
        EVENT_FIELD,
    ]
    args += [payload for _, payload in settlement.publishes]
    for _, value, ttl_s in settlement.writes:
        args += [value, ttl_s]
    for ids in settlement.acks.values():
        args.append(len(ids))
        args += ids
    return keys, args
