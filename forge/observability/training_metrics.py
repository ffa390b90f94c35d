"""Prometheus instruments of the training queue: GPU admission waits and CPU fallbacks.
Registered on a ``Metrics`` registry beside the runtime's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class TrainingQueueMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.admission_waits_total = Counter(
            "forge_training_admission_waits_total",
            "Checks that found no GPU with room for a training, which then waited (one per "
            "FORGE_GPU_ADMISSION_POLL_S of waiting).",
            ["model"],
            registry=registry,
        )
        self.admission_waiting = Gauge(
            "forge_training_admission_waiting",
            "Trainings waiting for GPU memory right now (delivered, leased, not failed).",
            ["model"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.cpu_fallbacks_total = Counter(
            "forge_training_cpu_fallbacks_total",
            "Trainings that fitted on no GPU and ran on the CPU "
            "(FORGE_GPU_ADMISSION_CPU_FALLBACK).",
            ["model"],
            registry=registry,
        )
