"""docs/configuration.md, generated from ``forge.settings``.

Variable names and converters come from ``ENV_VARS``, defaults and types from the
``Settings`` fields, and the one-line descriptions from ``DESCRIPTIONS`` below: a new
setting without a description fails the docs test, so the page cannot fall behind.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import msgspec

from forge.settings import ENV_VARS, Settings
from forge.settings_values import parse_size

DESCRIPTIONS: dict[str, str] = {
    "redis_url": "Redis server (`redis://`, `rediss://` or `unix://`). Unset: an embedded "
    "`redis-server` with AOF persistence under `FORGE_HOME/data/redis`.",
    "postgres_url": "PostgreSQL with pgvector for collections. Unset: an embedded PostgreSQL "
    "under `FORGE_HOME/data/postgres`.",
    "mlflow_tracking_uri": "MLflow tracking server for trainings and the model registry. "
    "Unset: an embedded SQLite store, `sqlite:///FORGE_HOME/mlflow/mlflow.db`, with run "
    "artifacts in `FORGE_HOME/mlflow/artifacts`. `MLRUN_DBPATH` is the original design's "
    "name and wins when both are set.",
    "stream_prefix": "Prefix of every Redis key and stream name; lets deployments and tests "
    "share one Redis.",
    "group": "Consumer group that Forge's workers read the input streams in.",
    "stream_maxlen": "Approximate length (MAXLEN ~) output streams are trimmed to.",
    "redis_cluster": (
        "`REDIS_URL` names any node of a Redis Cluster: use redis-py's cluster client "
        "(see docs/redis-cluster.md)."
    ),
    "stream_partitions": (
        "Partitions of each input stream, each under its own hash tag "
        "(1: today's names; see docs/redis-cluster.md)."
    ),
    "max_batch_size": "Entries read per XREADGROUP and handed to a handler at once, and texts "
    "per model call (at most; see `FORGE_EMBED_BATCH_TOKENS`). `new-data` reads "
    "`FORGE_EMBED_PIPELINE_DEPTH` times as many entries.",
    "read_block_s": "How long one XREADGROUP blocks waiting for new entries.",
    "retry_attempts": "In-process attempts at a handler call failing with a transient error "
    "(connection, timeout, resource) before the delivery counts as failed.",
    "retry_backoff_initial_s": "Scale of the in-process retry delay (exponential, full jitter).",
    "retry_backoff_max_s": "Largest in-process retry delay.",
    "max_deliveries": "Failed deliveries of an entry before it is dead-lettered.",
    "redeliver_delay_s": "Delay before a failed delivery is retried; doubles with each one.",
    "claim_min_idle_s": "Idle time after which another worker reclaims an entry (XAUTOCLAIM); "
    "leases are renewed every third of it.",
    "reclaim_interval_s": "How often a worker looks for entries of dead workers to reclaim.",
    "drain_timeout_s": "On SIGTERM, how long the batch in flight may take before the process "
    "exits anyway (its entries stay pending and are reclaimed).",
    "db_connect_wait_s": "How long a worker waits for PostgreSQL on its first connection "
    "before failing the event (an outage must not spend its deliveries).",
    "idempotency_ttl_s": "How long done markers remember a processed event id (duplicates "
    "within it are answered without running the handler again).",
    "max_payload_bytes": "Largest `event` field accepted; larger entries are dead-lettered.",
    "max_records_per_event": "Most records one `new-data` event may carry.",
    "max_text_chars": "Longest record text accepted for embedding.",
    "model_cache_size_bytes": "Memory budget of the in-process model cache (least recently "
    "used models are evicted).",
    "cache_ttl_s": "Lifetime of entries in the Redis embedding cache.",
    "training_timeout_s": "Limit on one training; a request's `timeout_s` may only shorten it.",
    "tune_poll_s": "How often the worker running a hyperparameter search (`tune`) checks "
    "the study while other workers run its trials.",
    "training_concurrency": "Trainings one worker runs at once (each in a thread of its "
    "own); it reads a new training request only when one of these slots is free.",
    "priority_aging_s": "How long a training request waits before it competes one priority "
    "level higher (low as normal, then as high), so low requests are never starved.",
    "gpu_admission_headroom_bytes": "Free GPU memory a training must leave besides its "
    "estimated need (CUDA context, allocator slack) to be admitted to a GPU.",
    "gpu_admission_poll_s": "How often a training that does not fit on any GPU checks free "
    "memory again; it keeps its lease and its delivery meanwhile.",
    "gpu_admission_cpu_fallback": "A training that does not fit on any GPU runs on the CPU "
    "at once instead of waiting for GPU memory.",
    "onnx_max_accuracy_delta": 'A version trained with `"export": ["onnx"]` serves '
    "through ONNX Runtime, its int8 export first, else its float32 one, when that export's "
    "validation accuracy is at most this much below the torch model's (0.005: half a point); "
    "else torch serves it.",
    "embedding_model": "Default sentence-transformers model for `new-data` events.",
    "embed_pipeline_depth": "Model batches one `new-data` read may hold: each batch's rows are "
    "written while the next batch is embedded, so the model does not wait for the database. "
    "1 turns the overlap off.",
    "embed_reads_in_flight": "`new-data` reads one worker holds at once: above 1, the next "
    "read is embedded while the last rows of the one before are written, so the model does "
    "not wait between reads either. Their writes still commit in the order the reads reach "
    "the model. 1 turns this off.",
    "embed_batch_tokens": "Padded tokens one model batch may hold (its texts times the "
    "longest one's tokens). Texts are sorted by token length and batched under this budget "
    "and `MAX_BATCH_SIZE`, so short texts share large batches and long ones cannot exhaust "
    "memory; vectors come back in input order.",
    "hnsw_m": "HNSW graph links per vector (pgvector `m`, 2-100) of collections created from "
    "now on; existing collections keep the index they were built with. Lower: cheaper "
    "ingest, lower recall.",
    "hnsw_ef_construction": "HNSW candidate list while building (pgvector `ef_construction`, "
    "4-1000, at least twice `FORGE_HNSW_M`) of collections created from now on. Lower: "
    "cheaper ingest, lower recall.",
    "hnsw_ef_search": "HNSW candidate list of a search (pgvector `hnsw.ef_search`, 1-1000), "
    "raised to k for larger k. Higher: better recall, slower searches; applies to every "
    "collection.",
    "vector_storage": "Column type of collections created from then on: `vector` "
    "(float32) or `halfvec` (float16: half the size on disk and in memory, recall about "
    "the same; see docs/benchmarks.md). Existing collections keep theirs; re-embed one "
    "to change it.",
    "bulk_load_rows": "Collections created by `new-data` events start without their HNSW "
    "index (searches are exact scans meanwhile) and one worker builds it once, "
    "concurrently, when the first load is over: after `FORGE_BULK_LOAD_QUIET_S` without a "
    "write, or as soon as the collection holds this many rows and no entry waits on the "
    "stream. 0: collections get their index at creation (live maintenance).",
    "bulk_load_quiet_s": "How long a collection waiting for its deferred HNSW index goes "
    "without a write before its first load counts as over and the index is built (at most "
    "this long after its last write, a small collection is indexed).",
    "home_dir": "Forge's data folder: embedded servers' data, and the default for the "
    "folders below.",
    "model_dir": "Downloaded and trained models.",
    "cache_dir": "On-disk caches.",
    "log_dir": "Where `forge.log` (JSON lines, rotated) is written; unset: stderr only.",
    "pg_bin_dir": "Folder holding the `pg_dump` and `pg_restore` that `forge backup` runs. "
    "Unset: the embedded PostgreSQL wheel's, for the server's major version, else those on "
    "`PATH`.",
    "serve_host": "Interface `forge serve` listens on. Beyond loopback it refuses to start "
    "without `FORGE_API_TOKEN`.",
    "serve_port": "Port of `forge serve`'s HTTP API (0 picks a free one).",
    "serve_workers": "Server processes `forge serve` runs, sharing the port.",
    "serve_max_wait_ms": "Longest a prediction waits for others to share its model call "
    "(micro-batching); a batch also closes at `MAX_BATCH_SIZE` inputs. 0: no waiting.",
    "serve_max_body_bytes": "Largest HTTP request body the API reads; larger ones get 413.",
    "api_token": "Bearer token the HTTP API requires (`Authorization: Bearer ...`); unset: "
    "no auth, allowed on loopback only. `/health` stays open.",
    "serve_reload_interval_s": "How often servers and predict workers look in Redis for split, "
    "shadow, alias and version changes that Forge announced (one round trip).",
    "serve_registry_poll_s": "How often they also read every served model's aliases from the "
    "registry, for aliases moved outside Forge (MLflow's UI or client).",
    "feedback_window_s": "How long a prediction is kept so that feedback can be joined to it.",
    "compare_min_feedback": "Feedback each variant needs before `forge models compare` (and "
    "`promote: on-significance`) gives a verdict.",
    "http_host": "Interface `/health` and `/metrics` listen on.",
    "http_port": "Port of `/health` and `/metrics` (0 picks a free one).",
    "log_level": "`DEBUG`, `INFO`, `WARNING` or `ERROR`. One-shot commands default to `WARNING`.",
    "log_format": "`json`, `console`, or `auto` (console on a terminal, JSON otherwise).",
}

# Defaults that are computed, or that mean something other than their literal value.
_DEFAULT_TEXT: dict[str, str] = {
    "redis_url": "embedded",
    "postgres_url": "embedded",
    "mlflow_tracking_uri": "embedded",
    "home_dir": "`~/.local/share/forge`",
    "model_dir": "`FORGE_HOME/models`",
    "cache_dir": "`FORGE_HOME/cache`",
    "log_dir": "unset",
    "pg_bin_dir": "unset",
    "api_token": "unset",
}

_HEADER = """\
# Configuration

<!-- Generated by `forge docs export` from forge/settings.py and forge/contracts/configdoc.py:
     edit those, then regenerate. -->

Forge reads its configuration from environment variables once, at start
(`Settings.from_env()`); nothing is read at import time. An empty variable counts as
unset. Where two variables set one setting, the first one listed wins. Setting names
carry their units: `_s` seconds, `_bytes` bytes. Byte sizes accept `2GB`, `512MiB` or
plain numbers; booleans `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`. Values
are validated at start: a bad one stops Forge with a one-line error naming the variable.

`forge worker --http-port` and `--http-host` override their variables for one run.

"""

_FOOTER = """
Settings with no variable (`-`) keep their defaults unless code builds its own
`forge.settings.Settings`, as the tests do.
"""


def variables_by_field() -> dict[str, list[str]]:
    """Setting name -> its environment variables, in ``ENV_VARS`` order."""
    found: dict[str, list[str]] = {}
    for var, (name, _) in ENV_VARS.items():
        found.setdefault(name, []).append(var)
    return found


def _type_text(name: str, annotation: Any) -> str:
    converters = {convert for var, (field, convert) in ENV_VARS.items() if field == name}
    if parse_size in converters:
        return "byte size"
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    names = {str: "string", bool: "boolean", int: "integer", float: "number", Path: "path"}
    if name.endswith("_url") or name.endswith("_uri"):
        return "URL"
    return names.get(annotation, str(annotation))


def _default_text(field: msgspec.structs.FieldInfo) -> str:
    if field.name in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[field.name]
    value = field.default
    if isinstance(value, int) and not isinstance(value, bool) and field.name.endswith("_bytes"):
        return f"`{value}` ({_human_bytes(value)})"
    return f"`{value}`"


def _human_bytes(value: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("GB", 10**9), ("MB", 10**6)):
        if value % factor == 0:
            return f"{value // factor} {unit}"
    return f"{value} B"


def rows() -> list[tuple[str, str, str, str, str]]:
    """(variables, setting, type, default, description) for every setting, in field order."""
    variables = variables_by_field()
    out = []
    for field in msgspec.structs.fields(Settings):
        names = ", ".join(f"`{v}`" for v in variables.get(field.name, [])) or "-"
        out.append(
            (
                names,
                f"`{field.name}`",
                _type_text(field.name, field.type),
                _default_text(field),
                DESCRIPTIONS.get(field.name, ""),
            )
        )
    return out


def render() -> str:
    lines = [
        "| Variable | Setting | Type | Default | Description |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return _HEADER + "\n".join(lines) + "\n" + _FOOTER
