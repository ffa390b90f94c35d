"""Every Redis key and stream name Forge uses, in one place.

All names start with the configurable prefix (``FORGE_STREAM_PREFIX``, default
``forge:``) so several deployments can share one Redis and tests can isolate themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forge.settings import Settings


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "forge:"
    group: str = "forge"

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        return cls(prefix=settings.stream_prefix, group=settings.group)

    # Input streams.
    @property
    def training_requests(self) -> str:
        return f"{self.prefix}training-requests"

    @property
    def new_data(self) -> str:
        return f"{self.prefix}new-data"

    # Output streams (trimmed with approximate MAXLEN).
    @property
    def completions(self) -> str:
        return f"{self.prefix}completions"

    @property
    def model_versions(self) -> str:
        return f"{self.prefix}model-versions"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead-letter"

    @property
    def training_progress(self) -> str:
        return f"{self.prefix}training-progress"

    @property
    def dead_letter_replays(self) -> str:
        """Hash: source event id -> how often it was replayed from the dead-letter stream."""
        return f"{self.prefix}dead-letter:replays"

    @property
    def dead_letter_replays_total(self) -> str:
        """Counter of all replays ever made."""
        return f"{self.prefix}dead-letter:replays-total"

    def done(self, stream: str, event_id: str) -> str:
        """Idempotency marker: the event's effects on ``stream`` are complete."""
        return f"{self.prefix}done:{self.group}:{stream}:{event_id}"

    def last_error(self, stream: str, entry_id: str) -> str:
        """The error of an entry's latest failed delivery, kept for its dead-letter record."""
        return f"{self.prefix}last-error:{self.group}:{stream}:{entry_id}"

    def embedding_cache(self, model: str, content_hash: str) -> str:
        return f"{self.prefix}emb:{model}:{content_hash}"

    def short(self, stream: str) -> str:
        """A stream's name without the prefix, for metric labels and messages."""
        return stream.removeprefix(self.prefix)

    def resolve(self, name: str) -> str:
        """Accept a stream by full name (``forge:new-data``) or short name (``new-data``)."""
        return name if name.startswith(self.prefix) else f"{self.prefix}{name}"

    @property
    def input_streams(self) -> tuple[str, ...]:
        return (self.training_requests, self.new_data)

    @property
    def output_streams(self) -> tuple[str, ...]:
        return (self.completions, self.model_versions, self.dead_letter, self.training_progress)
