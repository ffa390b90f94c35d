"""Feedback joined to what was predicted: each version that answered a prediction
(the served variant and any shadow) gets the feedback counted, and counted right when
it predicted the true label.

A prediction row is counted once, whatever event ids its feedback comes with: the
first feedback for row ``i`` sets the marker field ``feedback:i`` on the prediction's
hash to its event id (HSETNX), in the Lua script that increments the counters, so the
marker and the counts cannot part. A retry of the very event that set a marker (a
worker that died before its ack) finds its own id there: ``"again"``, counted already.

Per batch: one pipeline reads the predictions, one script call (with the routes of
the models they belong to, for automatic promotion) counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import redis

from forge.errors import PermanentError
from forge.keys import Keys
from forge.observability.serving_metrics import ServingMetrics
from forge.servers.lua import Script
from forge.serving.records import CORRECT, FEEDBACK, MODEL_FIELD
from forge.serving.routing import Route

MARKER_PREFIX = "feedback:"
SHADOW_PREFIX = "shadow:"
Status = Literal["counted", "again", "duplicate"]
_STATUS: dict[int, Status] = {1: "counted", 2: "again", 0: "duplicate"}
_EXPIRED = -1

# KEYS: per item its prediction hash, then the stats hash of each version that answered.
# ARGV: the number of items; per item the marker field, the event id, the number of
# versions, then per version 1 when it was right, else 0.
# Returns per item {status, then per version its new feedback and correct counts when
# counted}; status -1: the prediction expired since it was read (nothing is written).
_COUNT = f"""
local out = {{}}
local k, a = 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local prediction = KEYS[k]
  local marker, id, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  k, a = k + 1, a + 3
  local status = 0
  if redis.call('EXISTS', prediction) == 0 then
    status = {_EXPIRED}
  elseif redis.call('HSETNX', prediction, marker, id) == 1 then
    status = 1
  elseif redis.call('HGET', prediction, marker) == id then
    status = 2
  end
  local row = {{status}}
  for _ = 1, n do
    if status == 1 then
      row[#row + 1] = redis.call('HINCRBY', KEYS[k], '{FEEDBACK}', 1)
      row[#row + 1] = redis.call('HINCRBY', KEYS[k], '{CORRECT}', tonumber(ARGV[a]))
    end
    k, a = k + 1, a + 1
  end
  out[#out + 1] = row
end
return out
"""


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    event_id: str
    prediction_id: str
    index: int
    label: str


@dataclass(frozen=True, slots=True)
class Answer:
    """What one version answered for the row, and whether that was right."""

    version: int
    variant: str
    shadow: bool
    correct: bool


@dataclass(frozen=True, slots=True)
class Joined:
    model: str
    answers: list[Answer]
    status: Status
    # Version -> (feedback, correct) after this feedback; only when it was counted.
    counts: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def result(self) -> dict[str, Any]:
        """The completion's result."""
        return {
            "model": self.model,
            "counted": self.status != "duplicate",
            "correct": {str(a.version): a.correct for a in self.answers},
        }


class _Record(msgspec.Struct):
    variant: str
    labels: list[str]
    shadow: bool = False


_record = msgspec.json.Decoder(_Record)


class FeedbackJoin:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        metrics: ServingMetrics | None = None,
        window_s: int | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.metrics = metrics
        self.window_s = window_s
        self._count = Script(client, _COUNT)

    def join(
        self, items: Sequence[FeedbackItem]
    ) -> tuple[list[Joined | PermanentError], dict[str, Route]]:
        """Each item joined and counted, or the reason it cannot be; and the routes of
        the models the joined items belong to."""
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.hgetall(self.keys.prediction(item.prediction_id))
        raws: list[dict[bytes, bytes]] = pipe.execute()
        results: list[Joined | PermanentError] = []
        for item, raw in zip(items, raws, strict=True):
            try:
                results.append(self._answers(item, raw))
            except PermanentError as exc:
                results.append(exc)
        joined = [(i, r) for i, r in enumerate(results) if isinstance(r, Joined)]
        models = sorted({r.model for _, r in joined})
        rows, routes = self._count_all([(items[i], r) for i, r in joined], models)
        for (index, pending), row in zip(joined, rows, strict=True):
            results[index] = self._settled(items[index], pending, row)
        return results, routes

    # ------------------------------------------------------------------ steps

    def _answers(self, item: FeedbackItem, raw: dict[bytes, bytes]) -> Joined:
        """The item joined to its prediction record (counts not applied yet)."""
        model = raw.get(MODEL_FIELD.encode())
        answers: list[Answer] = []
        rows = 0
        for name, value in raw.items():
            if not name.isdigit():
                continue  # the model and the markers
            record = _record.decode(value)
            rows = len(record.labels)
            if item.index < rows:
                right = record.labels[item.index] == item.label
                answers.append(Answer(int(name), record.variant, record.shadow, right))
        if model is None or rows == 0:
            raise PermanentError(self._unknown(item))
        if not answers:
            raise PermanentError(
                f"prediction {item.prediction_id!r} has {rows} row(s):"
                f" index {item.index} is out of range"
            )
        answers.sort(key=lambda a: (a.shadow, a.version))
        return Joined(model.decode(), answers, "duplicate")

    def _count_all(
        self, pending: list[tuple[FeedbackItem, Joined]], models: list[str]
    ) -> tuple[list[list[int]], dict[str, Route]]:
        """One round trip: the counting script and the models' routes."""
        if not pending:
            return [], {}
        keys: list[str] = []
        args: list[str | int] = [len(pending)]
        for item, joined in pending:
            keys.append(self.keys.prediction(item.prediction_id))
            args += [f"{MARKER_PREFIX}{item.index}", item.event_id, len(joined.answers)]
            for answer in joined.answers:
                keys.append(self.keys.variant_stats(joined.model, answer.version))
                args.append(int(answer.correct))
        pipe = self.client.pipeline(transaction=False)
        self._count.queue(pipe, keys, args)
        for model in models:
            pipe.get(self.keys.route(model))
        rows, *raw_routes = pipe.execute()
        decoder = msgspec.json.Decoder(Route)
        routes = {
            model: Route() if raw is None else decoder.decode(raw)
            for model, raw in zip(models, raw_routes, strict=True)
        }
        return [[int(v) for v in row] for row in rows], routes

    def _settled(
        self, item: FeedbackItem, joined: Joined, row: list[int]
    ) -> Joined | PermanentError:
        status, *counts = row
        if status == _EXPIRED:
            return PermanentError(self._unknown(item))
        if _STATUS[status] != "counted":
            return Joined(joined.model, joined.answers, _STATUS[status])
        totals: dict[int, tuple[int, int]] = {}
        for answer, n, right in zip(joined.answers, counts[::2], counts[1::2], strict=True):
            totals[answer.version] = (n, right)
            self._observe(joined.model, answer, n, right)
        return Joined(joined.model, joined.answers, "counted", totals)

    def _observe(self, model: str, answer: Answer, feedback: int, correct: int) -> None:
        if self.metrics is None:
            return
        # Labelled as the engine labels predictions, so the two series line up.
        variant = f"{SHADOW_PREFIX}{answer.variant}" if answer.shadow else answer.variant
        self.metrics.feedback_total.labels(model=model, variant=variant).inc()
        self.metrics.online_accuracy.labels(model=model, variant=variant).set(correct / feedback)

    def _unknown(self, item: FeedbackItem) -> str:
        window = f" (kept {self.window_s} s)" if self.window_s else ""
        return (
            f"no prediction {item.prediction_id!r}: unknown, or older than the feedback"
            f" window{window}"
        )
