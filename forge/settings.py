"""Forge's configuration: one typed, immutable object built from the environment.

Nothing here is read at import time. ``Settings.from_env()`` is called once by the
CLI (or a test) and the resulting object is passed down explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from forge.errors import ConfigError
from forge.settings_values import parse_bool, parse_size, redact_url, strip_text

LogFormat = Literal["auto", "json", "console"]


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "forge"


# pgvector's limits on HNSW parameters: it refuses other values, at index creation or
# at query time, so they are refused when Forge starts instead.
HNSW_M_RANGE = (2, 100)
HNSW_EF_CONSTRUCTION_RANGE = (4, 1000)
HNSW_EF_SEARCH_RANGE = (1, 1000)


STORAGE_TYPES = ("vector", "halfvec")

# More partitions than this spread no further: a cluster rarely has more masters.
MAX_PARTITIONS = 256


def check_storage(storage: str) -> None:
    """Raise ``ConfigError`` unless ``storage`` is a column type collections can use."""
    if storage not in STORAGE_TYPES:
        raise ConfigError(
            f"vector_storage must be one of {', '.join(STORAGE_TYPES)}, got {storage!r}"
        )


def check_hnsw(m: int, ef_construction: int, ef_search: int) -> None:
    """Raise ``ConfigError`` unless pgvector accepts these HNSW parameters."""
    limits = {
        "hnsw_m": (m, HNSW_M_RANGE),
        "hnsw_ef_construction": (ef_construction, HNSW_EF_CONSTRUCTION_RANGE),
        "hnsw_ef_search": (ef_search, HNSW_EF_SEARCH_RANGE),
    }
    for name, (value, (low, high)) in limits.items():
        if not low <= value <= high:
            raise ConfigError(f"{name} must be {low}-{high}, got {value}")
    if ef_construction < 2 * m:
        raise ConfigError(
            f"hnsw_ef_construction must be at least twice hnsw_m ({2 * m}), got {ef_construction}"
        )


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every knob Forge has. Field names carry their units."""

    # Connections. ``None`` means "start the embedded server".
    redis_url: str | None = None
    postgres_url: str | None = None
    mlflow_tracking_uri: str | None = None

    # Streams and consumer group.
    stream_prefix: str = "forge:"
    group: str = "forge"
    stream_maxlen: int = 100_000
    redis_cluster: bool = False
    stream_partitions: int = 1

    # Runtime.
    max_batch_size: int = 32
    read_block_s: float = 1.0
    retry_attempts: int = 3
    retry_backoff_initial_s: float = 0.2
    retry_backoff_max_s: float = 5.0
    max_deliveries: int = 3
    redeliver_delay_s: float = 1.0
    claim_min_idle_s: float = 60.0
    reclaim_interval_s: float = 5.0
    drain_timeout_s: float = 30.0
    db_connect_wait_s: float = 60.0
    idempotency_ttl_s: int = 7 * 24 * 3600
    max_payload_bytes: int = 1_048_576
    max_records_per_event: int = 10_000
    max_text_chars: int = 20_000

    # ML.
    model_cache_size_bytes: int = 2 * 10**9
    cache_ttl_s: int = 3600
    training_timeout_s: float = 3600.0
    # How often the worker that runs a hyperparameter search looks at the study while
    # other workers run its trials.
    tune_poll_s: float = 1.0
    # The training queue: trainings one worker runs at once, how long a waiting request
    # takes to rise one priority level, and GPU admission.
    training_concurrency: int = 1
    priority_aging_s: float = 600.0
    gpu_admission_headroom_bytes: int = 512 * 2**20
    gpu_admission_poll_s: float = 5.0
    gpu_admission_cpu_fallback: bool = False
    # A version exported to ONNX serves through ONNX Runtime (int8 first, then float32)
    # when the export's validation accuracy is at most this far below the torch model's.
    onnx_max_accuracy_delta: float = 0.005
    embedding_model: str = "all-MiniLM-L6-v2"
    embed_pipeline_depth: int = 8
    embed_reads_in_flight: int = 2
    # Padded tokens one model batch may hold (texts times the longest one's tokens).
    embed_batch_tokens: int = 4096

    # Vector store: HNSW index parameters. m and ef_construction apply to collections
    # created from then on; ef_search to every search.
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 40
    # The column type of collections created from then on: "vector" (float32) or
    # "halfvec" (float16, half the size).
    vector_storage: str = "vector"
    # Collections created by new-data events start without their HNSW index, built once
    # when the first load is over: after ``bulk_load_quiet_s`` without a write, or once
    # they hold ``bulk_load_rows`` rows and no entry waits on the stream. 0: no deferral.
    bulk_load_rows: int = 10_000
    bulk_load_quiet_s: float = 30.0

    # Files. Container images set these to /models, /cache and /var/log/datapunk/forge.
    home_dir: Path = msgspec.field(default_factory=_default_home)
    model_dir: Path | None = None
    cache_dir: Path | None = None
    log_dir: Path | None = None
    # Where pg_dump and pg_restore are (``forge backup``); unset: those of the embedded
    # server's wheel for the server's major version, else PATH's.
    pg_bin_dir: Path | None = None

    # Serving (``forge serve``). ``api_token``: bearer token the HTTP API requires;
    # required when ``serve_host`` is beyond loopback.
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_workers: int = 1
    serve_max_wait_ms: float = 2.0
    serve_max_body_bytes: int = 1_048_576
    api_token: str | None = None
    # How often servers and predict workers look in Redis for route, alias and version
    # changes (Forge's own commands announce every one there).
    serve_reload_interval_s: float = 0.5
    # How often they also ask the model registry for aliases moved behind Forge's back
    # (MLflow's UI or client): a registry round trip per served model, so rarely.
    serve_registry_poll_s: float = 30.0
    # How long a prediction is kept for joining its feedback.
    feedback_window_s: int = 24 * 3600
    # Feedback each variant needs before a comparison may give a verdict.
    compare_min_feedback: int = 100

    # Observability.
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    log_level: str = "INFO"
    log_format: LogFormat = "auto"

    def __post_init__(self) -> None:
        positive = {
            "max_batch_size": self.max_batch_size,
            "embed_pipeline_depth": self.embed_pipeline_depth,
            "embed_reads_in_flight": self.embed_reads_in_flight,
            "embed_batch_tokens": self.embed_batch_tokens,
            "retry_attempts": self.retry_attempts,
            "max_deliveries": self.max_deliveries,
            "claim_min_idle_s": self.claim_min_idle_s,
            "tune_poll_s": self.tune_poll_s,
            "stream_maxlen": self.stream_maxlen,
            "serve_workers": self.serve_workers,
            "serve_max_body_bytes": self.serve_max_body_bytes,
            "serve_reload_interval_s": self.serve_reload_interval_s,
            "serve_registry_poll_s": self.serve_registry_poll_s,
            "feedback_window_s": self.feedback_window_s,
            "compare_min_feedback": self.compare_min_feedback,
            "training_concurrency": self.training_concurrency,
            "priority_aging_s": self.priority_aging_s,
            "gpu_admission_poll_s": self.gpu_admission_poll_s,
            "bulk_load_quiet_s": self.bulk_load_quiet_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name, port in (("http_port", self.http_port), ("serve_port", self.serve_port)):
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be 0-65535, got {port}")
        if self.gpu_admission_headroom_bytes < 0:
            raise ConfigError(
                f"gpu_admission_headroom_bytes must be 0 or more, got "
                f"{self.gpu_admission_headroom_bytes}"
            )
        if not self.onnx_max_accuracy_delta >= 0:  # NaN too
            raise ConfigError(
                f"onnx_max_accuracy_delta must be 0 or more, got {self.onnx_max_accuracy_delta}"
            )
        if self.bulk_load_rows < 0:
            raise ConfigError(f"bulk_load_rows must be 0 or more, got {self.bulk_load_rows}")
        if self.serve_max_wait_ms < 0:
            raise ConfigError(f"serve_max_wait_ms must be 0 or more, got {self.serve_max_wait_ms}")
        check_hnsw(self.hnsw_m, self.hnsw_ef_construction, self.hnsw_ef_search)
        check_storage(self.vector_storage)
        self._check_partitions()

    def _check_partitions(self) -> None:
        if not 1 <= self.stream_partitions <= MAX_PARTITIONS:
            raise ConfigError(
                f"stream_partitions must be 1-{MAX_PARTITIONS}, got {self.stream_partitions}"
            )
        partitioned = self.redis_cluster or self.stream_partitions > 1
        if partitioned and ("{" in self.stream_prefix or "}" in self.stream_prefix):
            # A brace would become the hash tag and put every partition in one slot.
            raise ConfigError(
                f"stream_prefix must not contain braces with partitions, got {self.stream_prefix!r}"
            )

    @property
    def embed_read_size(self) -> int:
        """Entries one ``new-data`` read holds: ``embed_pipeline_depth`` model batches."""
        return self.embed_pipeline_depth * self.max_batch_size

    @property
    def lease_renew_interval_s(self) -> float:
        """Renew in-flight leases well before another worker may reclaim them."""
        return self.claim_min_idle_s / 3

    @property
    def tune_heartbeat_s(self) -> int:
        """How often a running trial tells the study it is alive (Optuna takes whole
        seconds): a trial silent for two of these is stale, well within the time after
        which Forge reclaims its entry, so the reclaiming worker finds it stale."""
        return max(1, int(self.claim_min_idle_s / 4))

    @property
    def data_dir(self) -> Path:
        return self.home_dir / "data"

    @property
    def models_path(self) -> Path:
        return self.model_dir or self.home_dir / "models"

    @property
    def cache_path(self) -> Path:
        return self.cache_dir or self.home_dir / "cache"

    @property
    def logs_path(self) -> Path:
        return self.log_dir or self.home_dir / "logs"

    def replace(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """A printable view with secrets removed."""
        # Paths as strings: msgspec has no encoding of its own for them.
        data: dict[str, Any] = msgspec.to_builtins(self, enc_hook=str)
        for key in ("redis_url", "postgres_url", "mlflow_tracking_uri"):
            data[key] = redact_url(data[key])
        if data["api_token"]:
            data["api_token"] = "***"
        return data

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from environment variables (see ``ENV_VARS``)."""
        source = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, (field, convert) in ENV_VARS.items():
            raw = source.get(var)
            if raw is None or raw == "" or field in values:
                continue
            try:
                values[field] = convert(raw)
            except (ValueError, ConfigError) as exc:
                raise ConfigError(f"{var}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from None


# Environment variable -> (field, converter). Where two variables set one field the
# first listed wins (``MLRUN_DBPATH`` is the original design's name).
ENV_VARS: dict[str, tuple[str, Any]] = {
    "REDIS_URL": ("redis_url", strip_text),
    "POSTGRES_URL": ("postgres_url", strip_text),
    "MLRUN_DBPATH": ("mlflow_tracking_uri", strip_text),
    "MLFLOW_TRACKING_URI": ("mlflow_tracking_uri", strip_text),
    "MODEL_CACHE_SIZE": ("model_cache_size_bytes", parse_size),
    "MAX_BATCH_SIZE": ("max_batch_size", int),
    "FORGE_STREAM_PREFIX": ("stream_prefix", str),
    "FORGE_GROUP": ("group", str),
    "FORGE_STREAM_MAXLEN": ("stream_maxlen", int),
    "FORGE_REDIS_CLUSTER": ("redis_cluster", parse_bool),
    "FORGE_STREAM_PARTITIONS": ("stream_partitions", int),
    "FORGE_READ_BLOCK_S": ("read_block_s", float),
    "FORGE_RETRY_ATTEMPTS": ("retry_attempts", int),
    "FORGE_MAX_DELIVERIES": ("max_deliveries", int),
    "FORGE_REDELIVER_DELAY_S": ("redeliver_delay_s", float),
    "FORGE_CLAIM_MIN_IDLE_S": ("claim_min_idle_s", float),
    "FORGE_RECLAIM_INTERVAL_S": ("reclaim_interval_s", float),
    "FORGE_DRAIN_TIMEOUT_S": ("drain_timeout_s", float),
    "FORGE_DB_CONNECT_WAIT_S": ("db_connect_wait_s", float),
    "FORGE_IDEMPOTENCY_TTL_S": ("idempotency_ttl_s", int),
    "FORGE_MAX_PAYLOAD_BYTES": ("max_payload_bytes", parse_size),
    "FORGE_MAX_RECORDS_PER_EVENT": ("max_records_per_event", int),
    "FORGE_MAX_TEXT_CHARS": ("max_text_chars", int),
    "FORGE_CACHE_TTL_S": ("cache_ttl_s", int),
    "FORGE_TRAINING_TIMEOUT_S": ("training_timeout_s", float),
    "FORGE_TUNE_POLL_S": ("tune_poll_s", float),
    "FORGE_TRAINING_CONCURRENCY": ("training_concurrency", int),
    "FORGE_PRIORITY_AGING_S": ("priority_aging_s", float),
    "FORGE_GPU_ADMISSION_HEADROOM": ("gpu_admission_headroom_bytes", parse_size),
    "FORGE_GPU_ADMISSION_POLL_S": ("gpu_admission_poll_s", float),
    "FORGE_GPU_ADMISSION_CPU_FALLBACK": ("gpu_admission_cpu_fallback", parse_bool),
    "FORGE_ONNX_MAX_ACCURACY_DELTA": ("onnx_max_accuracy_delta", float),
    "FORGE_EMBEDDING_MODEL": ("embedding_model", str),
    "FORGE_EMBED_PIPELINE_DEPTH": ("embed_pipeline_depth", int),
    "FORGE_EMBED_READS_IN_FLIGHT": ("embed_reads_in_flight", int),
    "FORGE_EMBED_BATCH_TOKENS": ("embed_batch_tokens", int),
    "FORGE_HNSW_M": ("hnsw_m", int),
    "FORGE_HNSW_EF_CONSTRUCTION": ("hnsw_ef_construction", int),
    "FORGE_HNSW_EF_SEARCH": ("hnsw_ef_search", int),
    "FORGE_VECTOR_STORAGE": ("vector_storage", strip_text),
    "FORGE_BULK_LOAD_ROWS": ("bulk_load_rows", int),
    "FORGE_BULK_LOAD_QUIET_S": ("bulk_load_quiet_s", float),
    "FORGE_HOME": ("home_dir", Path),
    "FORGE_MODEL_DIR": ("model_dir", Path),
    "FORGE_CACHE_DIR": ("cache_dir", Path),
    "FORGE_LOG_DIR": ("log_dir", Path),
    "FORGE_PG_BIN_DIR": ("pg_bin_dir", Path),
    "FORGE_SERVE_HOST": ("serve_host", strip_text),
    "FORGE_SERVE_PORT": ("serve_port", int),
    "FORGE_SERVE_WORKERS": ("serve_workers", int),
    "FORGE_SERVE_MAX_WAIT_MS": ("serve_max_wait_ms", float),
    "FORGE_SERVE_MAX_BODY_BYTES": ("serve_max_body_bytes", parse_size),
    "FORGE_API_TOKEN": ("api_token", strip_text),
    "FORGE_SERVE_RELOAD_INTERVAL_S": ("serve_reload_interval_s", float),
    "FORGE_SERVE_REGISTRY_POLL_S": ("serve_registry_poll_s", float),
    "FORGE_FEEDBACK_WINDOW_S": ("feedback_window_s", int),
    "FORGE_COMPARE_MIN_FEEDBACK": ("compare_min_feedback", int),
    "FORGE_HTTP_HOST": ("http_host", str),
    "FORGE_HTTP_PORT": ("http_port", int),
    "FORGE_LOG_LEVEL": ("log_level", str),
    "FORGE_LOG_FORMAT": ("log_format", str),
}
