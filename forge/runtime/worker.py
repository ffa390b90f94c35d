"""The consumer-group worker loop.

One iteration: settle anything left unsettled by a Redis outage, then redeliver this
worker's failed entries that are due, else reclaim entries of dead workers (every
``reclaim_interval_s``), else read new entries (XREADGROUP, blocking). Batches are
processed one at a time, so a worker never holds more than one batch (its handler's
``max_batch_size``, else ``MAX_BATCH_SIZE`` entries) in flight plus a bounded set
awaiting redelivery.

Shutdown: the first SIGTERM/SIGINT stops reading; the batch in flight finishes and is
settled, then the loop exits 0. If draining takes longer than ``drain_timeout_s`` the
process exits anyway: unacked entries stay pending and another worker reclaims them.
A second signal exits at once, with the same guarantee.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

import redis
import structlog
from prometheus_client import Counter

from forge.runtime.broker import Entry
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry
from forge.runtime.lease import LeaseKeeper
from forge.runtime.processing import BatchProcessor, BatchResult
from forge.runtime.retry import Retrier

log = structlog.get_logger(__name__)

_BACKOFF_MAX_S = 30.0


def _group_lost(exc: redis.ResponseError) -> bool:
    """The stream or its group vanished: Redis restarted empty, or someone deleted it.
    A blocked XREADGROUP gets UNBLOCKED when its stream is deleted under it."""
    message = str(exc)
    return "NOGROUP" in message or "no longer exists" in message


class Worker:
    def __init__(
        self,
        ctx: Context,
        registry: HandlerRegistry,
        streams: Sequence[str] | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.keys = ctx.keys
        self.streams = [self.keys.resolve(s) for s in streams or registry.streams]
        self.processors = {
            stream: self._processor(registry, self.keys.short(stream)) for stream in self.streams
        }
        self.settle_retrier = Retrier(
            attempts=5, initial_s=0.2, max_s=5.0, max_total_s=30.0, on_retry=self._count_redis_error
        )
        self.lease = LeaseKeeper(
            ctx.broker,
            ctx.consumer,
            ctx.settings.lease_renew_interval_s,
            on_error=self._count_redis_error,
            on_renewed=heartbeat,
        )
        self.heartbeat = heartbeat
        self._stopping = threading.Event()
        self._signals = 0
        self._redeliveries: dict[str, dict[str, float]] = {s: {} for s in self.streams}
        self._next_reclaim = 0.0
        self._read_plan = self._plan_reads()
        largest = max((count for _, count in self._read_plan), default=1)
        self._max_waiting = max(4 * largest, 16)
        self._read_turn = 0
        self._received: dict[str, Counter] = {}  # metric children, looked up once

    def _plan_reads(self) -> list[tuple[list[str], int]]:
        """Streams grouped by batch size: one XREADGROUP per group."""
        groups: dict[int, list[str]] = {}
        for stream in self.processors:
            groups.setdefault(self._batch_size(stream), []).append(stream)
        return [(streams, count) for count, streams in groups.items()]

    def _batch_size(self, stream: str) -> int:
        """What the stream's handler asks for, else MAX_BATCH_SIZE."""
        return self.processors[stream].spec.max_batch_size or self.settings.max_batch_size

    def _processor(self, registry: HandlerRegistry, short: str) -> BatchProcessor:
        retries = self.ctx.metrics.retries_total.labels(stream=short)
        retrier = Retrier.from_settings(self.settings, on_retry=lambda exc, n: retries.inc())
        return BatchProcessor(self.ctx, registry.get(short), retrier)

    # ------------------------------------------------------------------ lifecycle

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        """Run until stopped; returns normally after a graceful drain."""
        self._install_signal_handlers()
        self.lease.start()
        failures = 0
        log.info("worker started", consumer=self.ctx.consumer, streams=self.streams)
        try:
            self._join_groups_with_backoff()
            while not self.stopping:
                self._beat()
                try:
                    self.run_once()
                    failures = 0
                except redis.AuthenticationError:
                    # Wrong credentials do not heal with time: fail loudly, once.
                    raise
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    failures += 1
                    self._backoff(exc, failures)
                except redis.ResponseError as exc:
                    if not _group_lost(exc):
                        raise
                    log.warning("consumer group or stream gone, recreating", error=str(exc))
                    self.ctx.broker.join_groups(self.streams, self.ctx.consumer)
        finally:
            self.lease.stop()
            self._forget_consumer()
            log.info("worker stopped", consumer=self.ctx.consumer)

    def run_once(self) -> int:
        """One iteration; returns how many entries it settled."""
        entries = self._due_redeliveries() or self._reclaim() or self._read()
        by_stream: dict[str, list[Entry]] = {}
        for entry in entries:
            by_stream.setdefault(entry.stream, []).append(entry)
        settled = 0
        for stream, batch in by_stream.items():
            settled += self._process(stream, batch)
        return settled

    # ------------------------------------------------------------------ sources

    def _read(self) -> list[Entry]:
        if self.stopping:
            return []
        if self._backlogged():
            # Backpressure: hold no more unacknowledged entries until these are retried.
            time.sleep(min(self._time_to_next_redelivery(), self.settings.read_block_s))
            return []
        block_s = min(self.settings.read_block_s, self._time_to_next_redelivery())
        entries = self._read_groups(max(int(block_s * 1000 / len(self._read_plan)), 1))
        counts: dict[str, int] = {}
        for entry in entries:
            counts[entry.stream] = counts.get(entry.stream, 0) + 1
        for stream, count in counts.items():
            received = self._received.get(stream)
            if received is None:
                short = self.keys.short(stream)
                received = self.ctx.metrics.events_received_total.labels(stream=short)
                self._received[stream] = received
            received.inc(count)
        return entries

    def _read_groups(self, block_ms: int) -> list[Entry]:
        """Read streams grouped by batch size (a trainer takes one request at a time,
        so it must not hold 32 leased), starting with a different group each time so a
        busy stream cannot starve the others."""
        plan = self._read_plan
        self._read_turn = (self._read_turn + 1) % len(plan)
        order = plan[self._read_turn :] + plan[: self._read_turn]
        if len(order) > 1:
            # First without blocking: a blocking read of an idle group would make a
            # backlog in another group wait the whole block time, every other turn.
            for streams, count in order:
                entries = self.ctx.broker.read(streams, self.ctx.consumer, count, None)
                if entries:
                    return entries
        for streams, count in order:
            entries = self.ctx.broker.read(streams, self.ctx.consumer, count, block_ms)
            if entries:
                return entries
        return []

    def _due_redeliveries(self) -> list[Entry]:
        now = time.monotonic()
        for stream, due in self._redeliveries.items():
            ready = [eid for eid, at in due.items() if at <= now][: self._batch_size(stream)]
            if ready:
                for eid in ready:
                    del due[eid]
                return self.ctx.broker.claim_own(stream, self.ctx.consumer, ready)
        return []

    def _reclaim(self) -> list[Entry]:
        now = time.monotonic()
        # Reclaimed entries count against the backlog like read ones: a worker whose
        # reclaims keep failing must not pile up other workers' entries without bound.
        if now < self._next_reclaim or self.stopping or self._backlogged():
            return []
        self._next_reclaim = now + self.settings.reclaim_interval_s
        min_idle_ms = int(self.settings.claim_min_idle_s * 1000)
        for stream in self.streams:
            claimed = self.ctx.broker.claim_stale(
                stream, self.ctx.consumer, min_idle_ms, self._batch_size(stream)
            )
            if claimed:
                short = self.keys.short(stream)
                self.ctx.metrics.reclaimed_total.labels(stream=short).inc(len(claimed))
                log.info("reclaimed entries of a silent worker", stream=stream, count=len(claimed))
                return claimed
        return []

    def _backlogged(self) -> bool:
        """As many entries await redelivery as a worker may hold."""
        return sum(len(d) for d in self._redeliveries.values()) >= self._max_waiting

    def _time_to_next_redelivery(self) -> float:
        times = [at for due in self._redeliveries.values() for at in due.values()]
        if not times:
            return self.settings.read_block_s
        return max(min(times) - time.monotonic(), 0.001)

    # ------------------------------------------------------------------ processing

    def _process(self, stream: str, batch: list[Entry]) -> int:
        ids = [e.entry_id for e in batch]
        self.lease.hold(stream, ids)
        try:
            result = self.processors[stream].process(stream, batch)
            self._settle(result)
        finally:
            self.lease.release(stream, ids)
        self._schedule_redeliveries(stream, result.failed)
        return len(batch) - len(result.failed)

    def _settle(self, result: BatchResult) -> None:
        """Finish the batch in Redis; while Redis is away, keep trying rather than redo
        the work (the lease is still held, so nobody else takes the entries meanwhile)."""
        settlement = result.settlement
        sent = False

        def attempt() -> None:
            nonlocal sent
            # After a lost connection the last attempt may have been applied with only
            # its reply lost; never apply it twice. If it was not applied but another
            # worker settled some of its entries, the rest stay pending and are
            # reclaimed: their effects are idempotent, their completions not.
            if sent and settlement.acks and self.ctx.broker.acked_any(settlement):
                log.warning(
                    "batch already settled (reply lost) or taken over; not settling again",
                    entries=sum(len(ids) for ids in settlement.acks.values()),
                )
                return
            sent = True
            self.ctx.broker.settle(settlement)

        while True:
            try:
                self.settle_retrier.call(attempt)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self._signals > 1:
                    raise
                self._backoff(exc, 5)

    def _schedule_redeliveries(self, stream: str, failed: list[Entry]) -> None:
        due = self._redeliveries[stream]
        for entry in failed:
            # Back off a little more with each failed delivery.
            delay_s = self.settings.redeliver_delay_s * (2 ** (entry.deliveries - 1))
            due[entry.entry_id] = time.monotonic() + delay_s

    # ------------------------------------------------------------------ helpers

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat()

    def _join_groups_with_backoff(self) -> None:
        attempt = 0
        while not self.stopping:
            try:
                self.ctx.broker.join_groups(self.streams, self.ctx.consumer)
                return
            except redis.AuthenticationError:
                raise
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                attempt += 1
                self._backoff(exc, attempt)

    def _backoff(self, exc: BaseException, attempt: int) -> None:
        self._count_redis_error(exc, attempt)
        delay_s = random.uniform(0, min(_BACKOFF_MAX_S, 0.1 * 2**attempt))
        log.warning(
            "redis unavailable, backing off",
            error=f"{type(exc).__name__}: {exc}",
            attempt=attempt,
            sleep_s=round(delay_s, 2),
        )
        self._stopping.wait(delay_s) if self._signals == 0 else time.sleep(delay_s)

    def _count_redis_error(self, exc: BaseException, attempt: int = 0) -> None:
        self.ctx.metrics.infrastructure_errors_total.labels(component="redis").inc()

    def _forget_consumer(self) -> None:
        """Remove this consumer from its groups if it holds nothing, so XINFO stays tidy."""
        try:
            for stream in self.streams:
                pending = self.ctx.redis.xpending_range(
                    stream, self.keys.group, "-", "+", 1, consumername=self.ctx.consumer
                )
                if not pending:
                    self.ctx.redis.xgroup_delconsumer(stream, self.keys.group, self.ctx.consumer)
        except redis.RedisError as exc:
            log.warning("could not remove consumer", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal, exiting now; unacked entries will be reclaimed")
            os._exit(128 + signum)
        log.info("signal received, draining", signal=signal.Signals(signum).name)
        self.stop()
        timer = threading.Timer(self.settings.drain_timeout_s, self._drain_timed_out)
        timer.daemon = True
        timer.start()

    def _drain_timed_out(self) -> None:
        log.warning(
            "drain timed out, exiting; unacked entries will be reclaimed",
            drain_timeout_s=self.settings.drain_timeout_s,
        )
        os._exit(0)
