"""What operators see: Prometheus metrics, the /health and /metrics endpoint, logs, and
the stream status shared by ``forge status``, ``/metrics`` and ``forge watch``."""
