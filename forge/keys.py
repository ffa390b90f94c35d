"""Every Redis key and stream name Forge uses, in one place.

All names start with the configurable prefix (``FORGE_STREAM_PREFIX``, default
``forge:``) so several deployments can share one Redis and tests can isolate themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from forge.settings import Settings

Priority = Literal["high", "normal", "low"]
# Highest first: the order a worker takes a prioritized stream's lanes in.
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


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

    @property
    def predict_requests(self) -> str:
        return f"{self.prefix}predict-requests"

    @property
    def feedback(self) -> str:
        return f"{self.prefix}feedback"

    @property
    def trials(self) -> str:
        """The trials of hyperparameter searches, for every trainer worker to run."""
        return f"{self.prefix}trials"

    # Output streams (trimmed with approximate MAXLEN).
    @property
    def completions(self) -> str:
        return f"{self.prefix}completions"

    @property
    def model_versions(self) -> str:
        return f"{self.prefix}model-versions"

    @property
    def predictions(self) -> str:
        return f"{self.prefix}predictions"

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

    # Priority lanes: a prioritized input stream is three streams. Its own name is the
    # ``normal`` lane, so producers that XADD to it keep working unchanged.
    @property
    def prioritized_streams(self) -> tuple[str, ...]:
        return (self.training_requests,)

    def lane(self, stream: str, priority: Priority) -> str:
        """The stream carrying ``stream``'s entries of ``priority``:
        ``forge:training-requests:high``, the stream itself for ``normal``."""
        return stream if priority == "normal" else f"{stream}:{priority}"

    def lanes(self, stream: str) -> tuple[str, ...]:
        """A prioritized stream's lanes, highest priority first; any other stream alone."""
        if stream not in self.prioritized_streams:
            return (stream,)
        return tuple(self.lane(stream, p) for p in PRIORITIES)

    def lane_of(self, stream: str) -> tuple[str, Priority]:
        """The prioritized stream a lane belongs to, and its priority (a stream that is
        no lane is its own, ``normal``)."""
        for base in self.prioritized_streams:
            for priority in PRIORITIES:
                if stream == self.lane(base, priority):
                    return base, priority
        return stream, "normal"

    def done(self, stream: str, event_id: str) -> str:
        """Idempotency marker: the event's effects on ``stream`` are complete. One
        marker for all lanes of a stream: an event id runs once whatever its priority."""
        base, _ = self.lane_of(stream)
        return f"{self.prefix}done:{self.group}:{base}:{event_id}"

    def admission_wait(self, stream: str, entry_id: str) -> str:
        """String, expiring: why a delivered entry waits to start (a training waiting
        for GPU memory), as JSON, refreshed while it waits; ``forge status`` reads it."""
        return f"{self.prefix}admission-wait:{self.group}:{stream}:{entry_id}"

    def last_error(self, stream: str, entry_id: str) -> str:
        """The error of an entry's latest failed delivery, kept for its dead-letter record."""
        return f"{self.prefix}last-error:{self.group}:{stream}:{entry_id}"

    def embedding_cache(self, model: str, content_hash: str) -> str:
        return f"{self.prefix}emb:{model}:{content_hash}"

    # Serving: routes, the predictions kept for the feedback join, online statistics.
    def route(self, model: str) -> str:
        """String: the model's traffic split, shadow and promotion policy, as JSON."""
        return f"{self.prefix}serving:route:{model}"

    @property
    def routes_epoch(self) -> str:
        """Counter, bumped on every route or alias change: servers poll it to reload."""
        return f"{self.prefix}serving:epoch"

    @property
    def serving_changes(self) -> str:
        """Stream, an entry per epoch bump (trimmed): servers block on it and on
        ``model_versions``, so a change reaches them at once, not at their next poll."""
        return f"{self.prefix}serving:changes"

    def prediction(self, prediction_id: str) -> str:
        """Hash: what a prediction answered (per variant, shadow included), kept for
        ``FORGE_FEEDBACK_WINDOW_S`` so feedback can be joined to it."""
        return f"{self.prefix}serving:prediction:{prediction_id}"

    def variant_stats(self, model: str, version: int) -> str:
        """Hash: online counters of one version (predictions, feedback, correct,
        latency buckets)."""
        return f"{self.prefix}serving:stats:{model}:{version}"

    def promotion(self, model: str, version: int) -> str:
        """String, set NX: the feedback event whose batch promotes this candidate
        (``promote: on-significance``), so concurrent workers promote it once."""
        return f"{self.prefix}serving:promotion:{model}:{version}"

    def promotion_event(self, feedback_id: str) -> str:
        """String: the ``model-version`` event a feedback event's batch promoted with,
        kept (for ``FORGE_IDEMPOTENCY_TTL_S``) so a retry of that event publishes it."""
        return f"{self.prefix}serving:promotion-event:{feedback_id}"

    # Key families as SCAN MATCH patterns (what ``forge backup`` copies).
    @property
    def everything(self) -> str:
        """Every key of this deployment: its prefix, whatever follows."""
        return f"{glob_escape(self.prefix)}*"

    def done_pattern(self, stream: str) -> str:
        return f"{glob_escape(self.done(stream, ''))}*"

    @property
    def route_pattern(self) -> str:
        return f"{glob_escape(self.route(''))}*"

    @property
    def prediction_pattern(self) -> str:
        return f"{glob_escape(self.prediction(''))}*"

    @property
    def variant_stats_pattern(self) -> str:
        return f"{glob_escape(self.prefix)}serving:stats:*"

    @property
    def promotion_pattern(self) -> str:
        return f"{glob_escape(self.prefix)}serving:promotion:*"

    @property
    def promotion_event_pattern(self) -> str:
        return f"{glob_escape(self.promotion_event(''))}*"

    def short(self, stream: str) -> str:
        """A stream's name without the prefix, for metric labels and messages."""
        return stream.removeprefix(self.prefix)

    def resolve(self, name: str) -> str:
        """Accept a stream by full name (``forge:new-data``) or short name (``new-data``)."""
        return name if name.startswith(self.prefix) else f"{self.prefix}{name}"

    @property
    def input_streams(self) -> tuple[str, ...]:
        return (
            self.training_requests,
            self.new_data,
            self.predict_requests,
            self.feedback,
            self.trials,
        )

    @property
    def input_lanes(self) -> tuple[str, ...]:
        """Every stream workers read: the input streams, prioritized ones as their lanes."""
        return tuple(lane for stream in self.input_streams for lane in self.lanes(stream))

    @property
    def output_streams(self) -> tuple[str, ...]:
        return (
            self.completions,
            self.model_versions,
            self.predictions,
            self.dead_letter,
            self.training_progress,
        )
