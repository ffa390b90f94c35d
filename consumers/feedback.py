"""The feedback handler: true labels joined to predictions, counted per version, and
automatic promotion for models under ``promote: on-significance``.

Feedback for a prediction Forge no longer holds (unknown, or past
``FORGE_FEEDBACK_WINDOW_S``) or for a row it did not have fails with the reason
(``PermanentError``): a ``failed`` completion, no retries. A row's second feedback,
under another event id, succeeds uncounted (``"counted": false``).

After the batch is counted, each model that got counted feedback and whose route says
``on-significance`` is compared (``forge.serving.autopromote``); a promotion's
``model-version`` event rides the completion of the model's last feedback event in
the batch, published in the transaction that acks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from consumers.once import Once
from forge.errors import PermanentError
from forge.events import Event, Feedback
from forge.runtime.context import Context
from forge.runtime.deadletter import error_info
from forge.runtime.handlers import Failed, Message, Outcome, Succeeded
from forge.serving.autopromote import OnlinePromotion
from forge.serving.feedback import FeedbackItem, FeedbackJoin, Joined
from forge.serving.routing import Route
from forge.training.versions import ModelVersions

ON_SIGNIFICANCE = "on-significance"


class FeedbackHandler:
    def __init__(self, ctx: Context, versions: Once[ModelVersions]) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.join = FeedbackJoin(
            ctx.redis, ctx.keys, ctx.metrics.serving, settings.feedback_window_s
        )
        self.promotion = OnlinePromotion(ctx.redis, ctx.keys, settings, versions)
        self.min_feedback = settings.compare_min_feedback

    def __call__(self, messages: Sequence[Message[Feedback]]) -> list[Outcome]:
        items = [_item(m.event) for m in messages]
        results, routes = self.join.join(items)
        publish = self._promotions(messages, results, routes)
        outcomes: list[Outcome] = []
        for index, result in enumerate(results):
            if isinstance(result, PermanentError):
                outcomes.append(Failed(error_info(result)))
                continue
            events = tuple((self.ctx.keys.model_versions, e) for e in publish.get(index, ()))
            outcomes.append(Succeeded(result.result, publish=events))
        return outcomes

    def _promotions(
        self,
        messages: Sequence[Message[Feedback]],
        results: Sequence[Joined | PermanentError],
        routes: dict[str, Route],
    ) -> dict[int, list[Event]]:
        """Events to publish, by the index of the message whose completion carries them."""
        publish: dict[int, list[Event]] = {}
        again = [i for i, r in enumerate(results) if isinstance(r, Joined) and r.status == "again"]
        recovered = self.promotion.recover([messages[i].event.id for i in again])
        for index in again:
            event = recovered.get(messages[index].event.id)
            if event is not None:
                publish.setdefault(index, []).append(event)
        for model, index in _owners(results, routes, self.min_feedback).items():
            event = self.promotion.evaluate(model, messages[index].event.id)
            if event is not None:
                publish.setdefault(index, []).append(event)
        return publish


def _item(event: Feedback) -> FeedbackItem:
    return FeedbackItem(event.id, event.prediction_id, event.index, event.label)


def _owners(
    results: Sequence[Joined | PermanentError], routes: dict[str, Route], min_feedback: int
) -> dict[str, int]:
    """Models to compare now, each with its last message that counted feedback.

    The comparison of champion and candidate changes only when one of them gets
    feedback, and it can promote only when that one has ``min_feedback``: a model none
    of whose versions counted here reached it is skipped without asking MLflow. A
    retried message, whose counts are not known, is not skipped."""
    owners: dict[str, int] = {}
    ready: set[str] = set()
    for index, result in enumerate(results):
        if not isinstance(result, Joined) or result.status == "duplicate":
            continue
        if routes.get(result.model, Route()).policy != ON_SIGNIFICANCE:
            continue
        owners[result.model] = index
        enough = any(n >= min_feedback for n, _ in result.counts.values())
        if result.status == "again" or enough:
            ready.add(result.model)
    return {model: index for model, index in owners.items() if model in ready}
