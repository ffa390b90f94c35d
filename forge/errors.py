"""Forge's exception hierarchy.

The runtime decides what to do with a failing event by the class of the error:

* ``TransientError`` (and connection, timeout and resource errors): retried in-process
  with backoff; if it still fails, the delivery has failed and Redis redelivers it.
* ``InvalidEvent``: the event can never succeed (undecodable, fails validation, violates
  a limit): dead-lettered at once, without retries.
* ``PermanentError``: a well-formed request that cannot be carried out (unknown task,
  too few labelled rows): acked with a ``failed`` completion, no retries, no dead letter.
* anything else: a failed delivery; dead-lettered after ``max_deliveries``.
"""

from __future__ import annotations


class ForgeError(Exception):
    """Base class of every error Forge raises on purpose."""


class ConfigError(ForgeError):
    """Invalid settings or command-line arguments."""


class UsageError(ConfigError):
    """A command-line argument argparse accepted but the command cannot use.

    The CLI exits 2 for it, as for argparse's own usage errors.
    """


class TransientError(ForgeError):
    """A failure that may succeed if tried again shortly."""


class InvalidEvent(ForgeError):
    """The event cannot be decoded or validated; retrying cannot help."""


class PermanentError(ForgeError):
    """The event is valid but the work it asks for cannot be done."""


class EmbeddedServerError(ForgeError):
    """An embedded server (redis-server, PostgreSQL) failed to start or stop."""


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying in-process: connections, timeouts, resources."""
    import redis.exceptions

    if isinstance(exc, TransientError | ConnectionError | TimeoutError | MemoryError):
        return True
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    if isinstance(exc, redis.exceptions.BusyLoadingError | redis.exceptions.TryAgainError):
        return True
    # A cluster master restarting, or its slots not served for a moment.
    if isinstance(exc, redis.exceptions.ClusterDownError | redis.exceptions.SlotNotCoveredError):
        return True
    # Errors from optional stacks, matched by name so forge core need not import them:
    # psycopg.OperationalError (server gone), torch.cuda.OutOfMemoryError (resource).
    return type(exc).__name__ in {"OperationalError", "OutOfMemoryError", "PoolTimeout"}
