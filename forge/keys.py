"""Every Redis key and stream name Forge uses, in one place.

All names start with the configurable prefix (``FORGE_STREAM_PREFIX``, default
``forge:``) so several deployments can share one Redis and tests can isolate themselves.

Partitions (docs/redis-cluster.md). With ``FORGE_STREAM_PARTITIONS`` above 1, or on a
Redis Cluster, every stream a settlement touches exists once per partition, under the
partition's hash tag (``partition_tag``): ``forge:{p2-1}:new-data``,
``forge:{p2-1}:completions``, ``forge:{p2-1}:done:...``. One tag per partition puts
everything one settlement touches in one slot, so the atomic settle stays one command;
the serving keys share one tag of their own, ``{serving}``. Otherwise the names are
today's, untagged. ``Keys`` itself names the logical streams (what handlers publish to,
what docs show); ``part(i)`` names partition ``i``'s, and the methods taking a stream
find its partition from the name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from forge.settings import Settings

Priority = Literal["high", "normal", "low"]
# Highest first: the order a worker takes a prioritized stream's lanes in.
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")

# The short names of the key families that live per partition: every stream a
# settlement touches (inputs, their lanes, completions, outputs published in one) and
# the per-entry keys (markers, last errors, admission waits). tests/test_keys.py holds
# this against the properties.
_SCOPED_FAMILIES = frozenset(
    (
        "training-requests",
        "new-data",
        "predict-requests",
        "feedback",
        "trials",
        "completions",
        "model-versions",
        "predictions",
        "dead-letter",
        "done",
        "last-error",
        "admission-wait",
    )
)


@functools.cache
def partition_tag(index: int, partitions: int) -> str:
    """The hash tag of partition ``index`` of ``partitions``: ``p<index>``, with the
    smallest suffix ``-<k>`` that puts its slot in the ``index``-th of ``partitions``
    equal ranges of slots. A cluster made with ``redis-cli --cluster create`` splits the
    slots into equal ranges, so N partitions on N masters get one master each; plain
    ``p0``, ``p1``, ``p2`` would put two of three on one master."""
    # Here, not at the top: commands that never partition (docs, schemas) import keys
    # and must not load redis-py.
    from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

    low = index * REDIS_CLUSTER_HASH_SLOTS // partitions
    high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // partitions
    suffix = 0
    while True:
        tag = f"p{index}-{suffix}" if suffix else f"p{index}"
        if low <= key_slot(tag.encode()) < high:
            return tag
        suffix += 1


_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "forge:"
    group: str = "forge"
    partitions: int = 1
    cluster: bool = False
    # None: the logical names (today's, untagged); else partition ``partition``'s.
    partition: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        return cls(
            prefix=settings.stream_prefix,
            group=settings.group,
            partitions=settings.stream_partitions,
            cluster=settings.redis_cluster,
        )

    # ------------------------------------------------------------------ partitions

    @property
    def partitioned(self) -> bool:
        """Whether streams live in tagged partitions (more than one, or a cluster)."""
        return self.cluster or self.partitions > 1

    @property
    def _scope(self) -> str:
        """What this partition's names start with: ``forge:{p2-1}:``, else the prefix."""
        if self.partition is None:
            return self.prefix
        return f"{self.prefix}{{{partition_tag(self.partition, self.partitions)}}}:"

    @property
    def _serving(self) -> str:
        return (
            f"{self.prefix}{{serving}}:serving:" if self.partitioned else f"{self.prefix}serving:"
        )

    def part(self, index: int) -> Keys:
        """Partition ``index``'s names."""
        if not 0 <= index < self.partitions:
            raise ValueError(f"no partition {index}: there are {self.partitions}")
        return replace(self, partition=index)

    @property
    def parts(self) -> tuple[Keys, ...]:
        """Where streams physically live: every partition, or just these names."""
        if not self.partitioned:
            return (self,)
        return tuple(replace(self, partition=i) for i in range(self.partitions))

    @property
    def logical(self) -> Keys:
        return self if self.partition is None else replace(self, partition=None)

    def part_of(self, name: str) -> Keys:
        """The partition a physical name belongs to (the logical names for any other)."""
        if not self.partitioned:
            return self  # the hot path: today's names, nothing to parse
        head = f"{self.prefix}{{p"
        if name.startswith(head):
            tag, sep, _ = name[len(head) - 1 :].partition("}:")
            index = tag[1:].split("-", 1)[0]
            if sep and index.isdigit() and int(index) < self.partitions:
                part = int(index)
                if tag == partition_tag(part, self.partitions):
                    return self if self.partition == part else replace(self, partition=part)
        return self.logical

    def localize(self, name: str) -> str:
        """A logical stream or key as this partition's (other names as they are): what
        a handler publishes to ``keys.model_versions`` goes to its entry's partition."""
        if self.partition is None or not name.startswith(self.prefix):
            return name
        rest = name[len(self.prefix) :]
        if rest.split(":", 1)[0] in _SCOPED_FAMILIES:
            return f"{self._scope}{rest}"
        return name

    def logical_name(self, name: str) -> str:
        """The logical name of a physical stream (``forge:{p2-1}:new-data`` ->
        ``forge:new-data``)."""
        part = self.part_of(name)
        return name if part.partition is None else f"{self.prefix}{name[len(part._scope) :]}"

    def physical(self, stream: str) -> tuple[str, ...]:
        """A logical stream's names in every partition (one for a stream that is not
        partitioned)."""
        return tuple(dict.fromkeys(part.localize(stream) for part in self.parts))

    def physical_lanes(self, stream: str) -> tuple[str, ...]:
        """Every stream a worker reads for a logical input stream: its lanes in every
        partition, partition by partition."""
        return tuple(lane for name in self.physical(stream) for lane in self.lanes(name))

    def label(self, stream: str) -> str:
        """The short logical name of any of a stream's lanes or partitions
        (``new-data``): its handler's name and its metric label."""
        base, _ = self.lane_of(stream)
        return self.short(self.logical_name(base))

    # ------------------------------------------------------------------ input streams

    @property
    def training_requests(self) -> str:
        return f"{self._scope}training-requests"

    @property
    def new_data(self) -> str:
        return f"{self._scope}new-data"

    @property
    def predict_requests(self) -> str:
        return f"{self._scope}predict-requests"

    @property
    def feedback(self) -> str:
        return f"{self._scope}feedback"

    @property
    def trials(self) -> str:
        """The trials of hyperparameter searches, for every trainer worker to run."""
        return f"{self._scope}trials"

    # Output streams (trimmed with approximate MAXLEN).
    @property
    def completions(self) -> str:
        return f"{self._scope}completions"

    @property
    def model_versions(self) -> str:
        return f"{self._scope}model-versions"

    @property
    def predictions(self) -> str:
        return f"{self._scope}predictions"

    @property
    def dead_letter(self) -> str:
        return f"{self._scope}dead-letter"

    @property
    def training_progress(self) -> str:
        """Not partitioned: progress is published outside settlements, and a dashboard
        reads one stream."""
        return f"{self.prefix}training-progress"

    @property
    def dead_letter_replays(self) -> str:
        """Hash: source event id -> how often it was replayed from the dead-letter stream."""
        return f"{self._scope}dead-letter:replays"

    @property
    def dead_letter_replays_total(self) -> str:
        """Counter of all replays ever made (per partition when partitioned)."""
        return f"{self._scope}dead-letter:replays-total"

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
        """A prioritized stream's lanes (in its partition), highest priority first; any
        other stream alone."""
        if stream not in self.part_of(stream).prioritized_streams:
            return (stream,)
        return tuple(self.lane(stream, p) for p in PRIORITIES)

    def lane_of(self, stream: str) -> tuple[str, Priority]:
        """The prioritized stream a lane belongs to (in its partition), and its priority
        (a stream that is no lane is its own, ``normal``)."""
        for base in self.part_of(stream).prioritized_streams:
            if stream == base:
                return base, "normal"
            if stream.startswith(base):  # on every entry's path: no names built
                suffix = stream[len(base) :]
                for priority in PRIORITIES:
                    if suffix == f":{priority}" and priority != "normal":
                        return base, priority
        return stream, "normal"

    def is_prioritized(self, stream: str) -> bool:
        """Whether ``stream`` (or a lane of it) is a prioritized stream of any partition."""
        base, _ = self.lane_of(stream)
        return base in self.part_of(base).prioritized_streams

    def done(self, stream: str, event_id: str) -> str:
        """Idempotency marker: the event's effects on ``stream`` are complete. One
        marker for all lanes of a stream: an event id runs once whatever its priority.
        In the stream's partition: a republish must go to the same one (the
        partitioning rule sends it there)."""
        base, _ = self.lane_of(stream)
        return (
            f"{self.part_of(stream)._scope}done:{self.group}:{self.logical_name(base)}:{event_id}"
        )

    def admission_wait(self, stream: str, entry_id: str) -> str:
        """String, expiring: why a delivered entry waits to start (a training waiting
        for GPU memory), as JSON, refreshed while it waits; ``forge status`` reads it."""
        return f"{self.part_of(stream)._scope}admission-wait:{self.group}:{stream}:{entry_id}"

    def last_error(self, stream: str, entry_id: str) -> str:
        """The error of an entry's latest failed delivery, kept for its dead-letter record."""
        return f"{self.part_of(stream)._scope}last-error:{self.group}:{stream}:{entry_id}"

    def embedding_cache(self, model: str, content_hash: str) -> str:
        return f"{self.prefix}emb:{model}:{content_hash}"

    # Serving: routes, the predictions kept for the feedback join, online statistics.
    # One hash tag for all of them when partitioned: a route change, a batch's
    # prediction records and the feedback join each touch several at once.
    def route(self, model: str) -> str:
        """String: the model's traffic split, shadow and promotion policy, as JSON."""
        return f"{self._serving}route:{model}"

    @property
    def routes_epoch(self) -> str:
        """Counter, bumped on every route or alias change: servers poll it to reload."""
        return f"{self._serving}epoch"

    @property
    def serving_changes(self) -> str:
        """Stream, an entry per epoch bump (trimmed): servers block on it and on
        ``model_versions``, so a change reaches them at once, not at their next poll."""
        return f"{self._serving}changes"

    def prediction(self, prediction_id: str) -> str:
        """Hash: what a prediction answered (per variant, shadow included), kept for
        ``FORGE_FEEDBACK_WINDOW_S`` so feedback can be joined to it."""
        return f"{self._serving}prediction:{prediction_id}"

    def variant_stats(self, model: str, version: int) -> str:
        """Hash: online counters of one version (predictions, feedback, correct,
        latency buckets)."""
        return f"{self._serving}stats:{model}:{version}"

    def promotion(self, model: str, version: int) -> str:
        """String, set NX: the feedback event whose batch promotes this candidate
        (``promote: on-significance``), so concurrent workers promote it once."""
        return f"{self._serving}promotion:{model}:{version}"

    def promotion_event(self, feedback_id: str) -> str:
        """String: the ``model-version`` event a feedback event's batch promoted with,
        kept (for ``FORGE_IDEMPOTENCY_TTL_S``) so a retry of that event publishes it."""
        return f"{self._serving}promotion-event:{feedback_id}"

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
        return f"{glob_escape(self._serving)}stats:*"

    @property
    def promotion_pattern(self) -> str:
        return f"{glob_escape(self._serving)}promotion:*"

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
        """Every stream workers read: the input streams in every partition, prioritized
        ones as their lanes."""
        logical = self.logical
        return tuple(lane for s in logical.input_streams for lane in logical.physical_lanes(s))

    def physical_outputs(self, stream: str) -> tuple[str, ...]:
        """An output stream's names in every partition (``training-progress``: one)."""
        return self.logical.physical(stream)

    @property
    def output_streams(self) -> tuple[str, ...]:
        return (
            self.completions,
            self.model_versions,
            self.predictions,
            self.dead_letter,
            self.training_progress,
        )
