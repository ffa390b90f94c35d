"""What was predicted, kept for the feedback join, and each version's online counters.

Every answer (the variant served and any shadow) is written under the prediction's id
for ``feedback_window_s``; the served one is what the caller saw, the shadow's only
Forge. Counters live per version, not per variant name: when a candidate becomes
champion its record goes with it, and a new candidate starts from zero.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import redis

from forge.keys import Keys

# Upper bounds of the latency buckets, in milliseconds; the last one is open.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500,
)  # fmt: skip
PREDICTIONS = "predictions"
FEEDBACK = "feedback"
CORRECT = "correct"
MODEL_FIELD = "model"


def latency_field(latency_s: float) -> str:
    return f"latency:{bisect.bisect_left(LATENCY_BUCKETS_MS, latency_s * 1000)}"


@dataclass(frozen=True, slots=True)
class Served:
    """One version's answer to one prediction request."""

    prediction_id: str
    model: str
    version: int
    variant: str
    labels: list[str]
    latency_s: float
    shadow: bool = False


class PredictionLog:
    """Writes answers and counters, one pipeline per batch of answers."""

    def __init__(self, client: redis.Redis, keys: Keys, window_s: int) -> None:
        self.client = client
        self.keys = keys
        self.window_s = window_s

    def record(self, served: Sequence[Served]) -> None:
        """One HSET and EXPIRE per prediction (its answers together: the variant's and
        any shadow's), one HINCRBY per counter the batch moved: a batch's answers mostly
        share their version and latency bucket, and each command costs the client more
        than the server."""
        if not served:
            return
        predictions: dict[str, dict[str, str | bytes]] = {}
        counts: Counter[tuple[str, str]] = Counter()
        for answer in served:
            fields = predictions.setdefault(answer.prediction_id, {MODEL_FIELD: answer.model})
            fields[str(answer.version)] = msgspec.json.encode(
                {"variant": answer.variant, "labels": answer.labels, "shadow": answer.shadow}
            )
            stats = self.keys.variant_stats(answer.model, answer.version)
            counts[stats, PREDICTIONS] += len(answer.labels)
            counts[stats, latency_field(answer.latency_s)] += 1
        pipe = self.client.pipeline(transaction=False)
        for prediction_id, mapping in predictions.items():
            key = self.keys.prediction(prediction_id)
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.expire(key, self.window_s)
        for (stats, field), count in counts.items():
            pipe.hincrby(stats, field, count)
        pipe.execute()
