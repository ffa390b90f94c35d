"""Prometheus instruments of online predictions, per model and variant. Registered on a
``Metrics`` registry so that ``/metrics`` of ``forge serve`` and of workers (the stream
door) carry them beside the runtime's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 0.1 ms (a cached single row) to 10 s (a cold load in the request path).
PREDICT_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "variant"]
        self.predictions_total = Counter(
            "forge_predictions_total", "Rows predicted.", labels, registry=registry
        )
        self.prediction_latency_seconds = Histogram(
            "forge_prediction_latency_seconds",
            "Time from a request's arrival to its answer (batching wait included).",
            labels,
            buckets=PREDICT_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.prediction_errors_total = Counter(
            "forge_prediction_errors_total",
            "Prediction requests refused or failed, by reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.feedback_total = Counter(
            "forge_feedback_total", "Feedback joined to a prediction.", labels, registry=registry
        )
        self.online_accuracy = Gauge(
            "forge_online_accuracy",
            "Share of joined feedback whose label the variant predicted.",
            labels,
            multiprocess_mode="livemostrecent",
            registry=registry,
        )
