"""The stream door: ``predict-requests`` in, one ``prediction`` each on
``forge:predictions``, through the runtime every input stream goes through (batches,
retries, dead letters, completions).

A batch is one call of the shared ``PredictionEngine``, the one ``forge serve`` uses:
it routes each request (a pinned ``model_version``, else the model's split by
``key``), scores each version once for the whole batch and records every answer,
shadows included, for the feedback join. The request's event id is the prediction's
id, so feedback names the request. Each prediction rides ``Succeeded.publish``: it is
published in the transaction that acks its request, exactly once.

A request the engine refuses (an unknown model or version, inputs the version cannot
take) fails with the engine's one-line reason: a ``failed`` completion, never a
retry. A model that cannot be loaded or run now (MLflow unreachable, say) is not the
request's fault: the batch raises ``TransientError``, so the runtime retries it and, if
it keeps failing, isolates and dead-letters it like any other infrastructure failure.
Invalid events (both ``vector`` and ``text`` in an input, say) never reach the
handler: the runtime dead-letters them with the reason.

The engine (MLflow, torch, the embedding model) is made on the first request
(``Once``), and asked to pick up route, alias and version changes at most every
``FORGE_SERVE_RELOAD_INTERVAL_S``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from consumers.once import Once
from forge.errors import TransientError
from forge.events import ErrorInfo, Prediction, PredictRequest, utcnow
from forge.runtime.context import Context
from forge.runtime.handlers import Failed, Message, Outcome, Succeeded

if TYPE_CHECKING:
    from datetime import datetime

    from forge.serving.engine import PredictAnswer, PredictError, PredictionEngine


class PredictHandler:
    def __init__(
        self,
        ctx: Context,
        engine: Once[PredictionEngine],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = ctx.keys.predictions
        self.engine = engine
        self.reload_interval_s = ctx.settings.serve_reload_interval_s
        self._clock = clock
        self._next_refresh_s: float | None = None

    def __call__(self, messages: Sequence[Message[PredictRequest]]) -> list[Outcome]:
        from forge.serving.engine import PredictCall, PredictError

        engine = self.engine()
        self._refresh(engine)
        calls = [
            PredictCall(
                model=m.event.model,
                inputs=m.event.inputs,
                key=m.event.key,
                version=m.event.model_version,
                prediction_id=m.event.id,
            )
            for m in messages
        ]
        answers = engine.predict(calls)
        unavailable = [a for a in answers if isinstance(a, PredictError) and a.retryable]
        if unavailable:
            raise TransientError(str(unavailable[0]))
        now = utcnow()
        return [
            _failed(answer) if isinstance(answer, PredictError) else self._answered(answer, now)
            for answer in answers
        ]

    def _refresh(self, engine: PredictionEngine) -> None:
        now = self._clock()
        if self._next_refresh_s is None:  # a new engine has just read everything
            self._next_refresh_s = now + self.reload_interval_s
        elif now >= self._next_refresh_s:
            engine.refresh()
            self._next_refresh_s = now + self.reload_interval_s

    def _answered(self, answer: PredictAnswer, now: datetime) -> Succeeded:
        event = Prediction(
            id=answer.prediction_id,
            created_at=now,
            source_id=answer.prediction_id,
            model=answer.model,
            model_version=answer.version,
            variant=answer.variant,
            predictions=answer.predictions,
        )
        result = {
            "model": answer.model,
            "model_version": answer.version,
            "variant": answer.variant,
            "predictions": len(answer.predictions),
        }
        return Succeeded(result, publish=((self.stream, event),))


def _failed(error: PredictError) -> Failed:
    # Returned, never raised: no traceback to keep.
    return Failed(ErrorInfo(type=type(error).__name__, message=str(error)))
