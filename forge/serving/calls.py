"""What either door (HTTP, the ``predict-requests`` stream) hands the prediction engine,
and what it gets back: one answer or one error per call."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from forge.errors import ForgeError
from forge.events import Label, PredictInput, new_id

NOT_FOUND = 404
INVALID = 422
# The model (or its embedding model) could not be loaded or run: not the caller's
# fault, and worth retrying, so 503 (the API never answers 500).
FAILED = 503

# Reasons of ``forge_prediction_errors_total``, by status.
ERROR_REASONS = {NOT_FOUND: "not-found", INVALID: "invalid-input", FAILED: "unavailable"}


@dataclass(frozen=True, slots=True)
class PredictCall:
    model: str
    inputs: list[PredictInput]
    # Routing key: a key keeps its variant while the split stands.
    key: str | None = None
    # An alias or a version number: pins the version, bypassing the split.
    version: str | int | None = None
    prediction_id: str = field(default_factory=new_id)
    # ``time.perf_counter()`` at arrival: latency is measured from here.
    arrived_s: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class PredictAnswer:
    prediction_id: str
    model: str
    version: int
    variant: str
    predictions: list[Label]


class PredictError(ForgeError):
    """Why one call got no answer, in one line. ``status`` as HTTP has it: 404 (no such
    model, version or alias), 422 (inputs the version cannot take), 503 (the model or
    its embedding model failed: not the caller's fault, worth retrying)."""

    @property
    def retryable(self) -> bool:
        return self.status == FAILED

    def __init__(self, message: str, status: int = INVALID) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status

    @property
    def reason(self) -> str:
        return ERROR_REASONS.get(self.status, "unavailable")
