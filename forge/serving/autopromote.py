"""``promote: on-significance``: the candidate becomes champion once it wins the online
comparison against the champion by the stricter bound for repeated looks
(``compare.promotes``: both with ``compare_min_feedback`` feedback, z >= 3.0).

Looked at after every feedback batch that counted feedback for the model. Exactly
once, across workers and crashes:

1. ``SET NX`` on ``Keys.promotion(model, candidate)`` with the feedback event's id:
   one batch, on one worker, wins; the aliases are read again after it, and a change
   since the comparison (someone promoted by hand) abandons the attempt.
2. The ``model-version`` event (reason and evidence) is stored under
   ``Keys.promotion_event(feedback_id)`` *before* the alias moves.
3. The alias moves (``forge.training.promotion.promote``) and the route epoch is
   bumped, so servers follow at once. The handler publishes the event in the
   transaction that acks the feedback event.

A delivery that fails after step 2 (a crash, an error) is retried with the same
feedback id, whose counts are already in (status ``"again"``): ``recover`` finds the
stored event, finishes step 3 if needed, and the event is published then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
import redis
import structlog

from forge.errors import PermanentError
from forge.events import ModelVersion, utcnow
from forge.keys import Keys
from forge.serving.compare import PROMOTION_Z, TEST, VariantStats, promotes, two_proportion_z
from forge.serving.experiment import read_stats
from forge.serving.routing import RouteStore
from forge.settings import Settings
from forge.training.promotion import promote
from forge.training.versions import CANDIDATE, CHAMPION, ModelVersions

log = structlog.get_logger(__name__)

REASON = "won online comparison"
_decoder = msgspec.json.Decoder(ModelVersion)


class OnlinePromotion:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        settings: Settings,
        versions: Callable[[], ModelVersions],
    ) -> None:
        self.client = client
        self.keys = keys
        self.min_feedback = settings.compare_min_feedback
        self.ttl_s = settings.idempotency_ttl_s
        self.routes = RouteStore(client, keys)
        # Opened on first use: MLflow is not needed until a model is under this policy.
        self.versions = versions

    def evaluate(self, model: str, feedback_id: str) -> ModelVersion | None:
        """Promote ``model``'s candidate if it won; the event to publish, if it did.
        Transient failures (MLflow, Redis) raise, for the runtime to retry the batch."""
        try:
            return self._evaluate(model, feedback_id)
        except PermanentError as exc:
            # A model or version deleted under its route: nothing to promote, and the
            # feedback that led here is counted all the same.
            log.warning("online promotion skipped", model=model, error=str(exc))
            return None

    def _evaluate(self, model: str, feedback_id: str) -> ModelVersion | None:
        versions = self.versions()
        aliases = versions.aliases(model)
        champion, candidate = aliases.get(CHAMPION), aliases.get(CANDIDATE)
        if champion is None or candidate is None or candidate == champion:
            return None
        stats = read_stats(self.client, self.keys, model, [champion, candidate])
        if not promotes(stats[champion], stats[candidate], self.min_feedback):
            return None
        lock = self.keys.promotion(model, candidate)
        if not self.client.set(lock, feedback_id, nx=True, ex=self.ttl_s):
            return None  # another batch promotes it
        try:
            if versions.aliases(model) != aliases:
                self.client.delete(lock)  # moved by someone else: compare again later
                return None
            event = self._event(versions, model, stats[champion], stats[candidate], feedback_id)
            encoded = msgspec.json.encode(event)
            self.client.set(self.keys.promotion_event(feedback_id), encoded, ex=self.ttl_s)
        except BaseException:
            self.client.delete(lock)
            raise
        return self._finish(versions, event)

    def recover(self, feedback_ids: Sequence[str]) -> dict[str, ModelVersion]:
        """Promotions that earlier attempts at these feedback events started: finished
        now, by feedback id, for the handler to publish."""
        if not feedback_ids:
            return {}
        raws = self.client.mget([self.keys.promotion_event(i) for i in feedback_ids])
        found = {i: _decoder.decode(raw) for i, raw in zip(feedback_ids, raws, strict=True) if raw}
        if not found:
            return {}
        versions = self.versions()
        finished: dict[str, ModelVersion] = {}
        for feedback_id, event in found.items():
            try:
                finished[feedback_id] = self._finish(versions, event)
            except PermanentError as exc:
                log.warning("online promotion skipped", model=event.model, error=str(exc))
        return finished

    # ------------------------------------------------------------------ helpers

    def _finish(self, versions: ModelVersions, event: ModelVersion) -> ModelVersion:
        if versions.aliases(event.model).get(CHAMPION) != event.model_version:
            promote(versions, event.model, event.model_version)
            log.info(
                "candidate promoted on online significance",
                model=event.model,
                version=event.model_version,
                z=event.evidence.get("z"),
            )
        self.routes.bump()
        return event

    def _event(
        self,
        versions: ModelVersions,
        model: str,
        champion: VariantStats,
        candidate: VariantStats,
        feedback_id: str,
    ) -> ModelVersion:
        info = versions.get(model, candidate.version)
        z = two_proportion_z(champion, candidate)
        evidence = {
            "test": TEST,
            "bound": f"z >= {PROMOTION_Z}",
            "z": None if z is None else round(z, 4),
            "min_feedback": self.min_feedback,
            "champion": _side(champion),
            "candidate": _side(candidate),
            "feedback_id": feedback_id,
        }
        return ModelVersion(
            id=f"{model}:v{candidate.version}:promoted",
            created_at=utcnow(),
            model=model,
            model_version=candidate.version,
            run_id=info.run_id,
            source_id=info.request_id,
            metrics=versions.metrics(info),
            aliases=[CHAMPION],
            artifact_uri=info.source,
            reason=REASON,
            evidence=evidence,
        )


def _side(stats: VariantStats) -> dict[str, int | float | None]:
    accuracy = stats.accuracy
    return {
        "version": stats.version,
        "feedback": stats.feedback,
        "correct": stats.correct,
        "accuracy": None if accuracy is None else round(accuracy, 6),
    }
