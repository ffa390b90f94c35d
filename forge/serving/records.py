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
from forge.servers.lua import Script

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


# KEYS: each prediction's hash, then each counters hash once per field it moves.
# ARGV: the expiry, the number of predictions; per prediction its number of fields, then
# field and value pairs; then per counter its field and increment.
_RECORD_LUA = """
local window_s, predictions = ARGV[1], tonumber(ARGV[2])
local a = 3
for k = 1, predictions do
  local last = a + 2 * tonumber(ARGV[a])
  redis.call('HSET', KEYS[k], unpack(ARGV, a + 1, last))
  redis.call('EXPIRE', KEYS[k], window_s)
  a = last + 1
end
for k = predictions + 1, #KEYS do
  redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
  a = a + 2
end
return 1
"""


class PredictionLog:
    """Writes a batch's answers and counters in one script call."""

    def __init__(self, client: redis.Redis, keys: Keys, window_s: int) -> None:
        self.client = client
        self.keys = keys
        self.window_s = window_s
        self._record = Script(client, _RECORD_LUA)

    def record(self, served: Sequence[Served]) -> None:
        """One HSET and EXPIRE per prediction (its answers together: the variant's and
        any shadow's), one HINCRBY per counter the batch moved, all in one command: a
        batch's answers mostly share their version and latency bucket, and each
        command costs the client more than the server."""
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
        keys = [self.keys.prediction(prediction_id) for prediction_id in predictions]
        args: list[str | bytes | int] = [self.window_s, len(predictions)]
        for mapping in predictions.values():
            args.append(len(mapping))
            for field, value in mapping.items():
                args += [field, value]
        for (stats, field), count in counts.items():
            keys.append(stats)
            args += [field, count]
        self._record(keys, args)
