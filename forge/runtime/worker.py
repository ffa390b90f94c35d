"""The consumer-group worker loop.

One iteration (``Worker.run_once``) reads top to bottom: take the next batches from
the ``BatchSource`` (due redeliveries, else reclaims, else new entries), then for each
batch hold its lease, process it (``BatchProcessor``), settle it in Redis, and hand its
failed entries back to the source for redelivery. Batches are processed one at a time,
so a worker never holds more than one batch (its handler's ``max_batch_size``, else
``MAX_BATCH_SIZE`` entries) in flight plus a bounded set awaiting redelivery; except
those of a handler asking for ``concurrency`` (the trainer): up to that many of its
batches run beside the loop, in ``Slots``.

A prioritized stream (``Keys.prioritized_streams``) is read as its priority lanes,
each processed as a stream of its own by the stream's handler.

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

from forge.runtime.context import Context
from forge.runtime.entries import Entry, Settlement
from forge.runtime.handlers import HandlerRegistry
from forge.runtime.lease import LeaseKeeper
from forge.runtime.processing import BatchProcessor
from forge.runtime.retry import Retrier
from forge.runtime.slots import Slots
from forge.runtime.sources import BatchSource
from forge.servers.connect import REDIS_UNAVAILABLE

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
        named = [self.keys.resolve(s) for s in streams or registry.streams]
        # Each lane of each partition is a stream of its own to the loop, processed by
        # its logical stream's handler.
        self.streams = [
            lane
            for stream in named
            for lane in self.keys.physical_lanes(self.keys.logical_name(stream))
        ]
        self.processors = {
            stream: self._processor(registry, self.keys.label(stream)) for stream in self.streams
        }
        self._stopping = threading.Event()
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
        self.slots = self._slots()
        self.source = BatchSource(ctx, self._batch_sizes(), self._stopping, room=self.slots)
        self.heartbeat = heartbeat
        self._signals = 0

    def _batch_sizes(self) -> dict[str, int]:
        """What each stream's handler asks for, else MAX_BATCH_SIZE."""
        default = self.settings.max_batch_size
        return {s: p.spec.max_batch_size or default for s, p in self.processors.items()}

    def _slots(self) -> Slots:
        """Slots for the streams whose handler asks for concurrency: a prioritized
        stream's lanes share their handler's."""
        pools: dict[str, tuple[str, int]] = {}
        ranks: dict[str, int] = {}
        for stream, processor in self.processors.items():
            if processor.spec.concurrency > 1:
                base = self.keys.lane_of(stream)[0]
                # One pool per logical stream: partitions share the handler's concurrency.
                pools[stream] = (self.keys.logical_name(base), processor.spec.concurrency)
                ranks[stream] = self.keys.lanes(base).index(stream)
        return Slots(pools, self.lease, self._process, ranks)

    def _processor(self, registry: HandlerRegistry, short: str) -> BatchProcessor:
        observer = self.ctx.observer
        retrier = Retrier.from_settings(
            self.settings, on_retry=lambda exc, attempt: observer.retried(short)
        )
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
                except REDIS_UNAVAILABLE as exc:
                    failures += 1
                    self._backoff(exc, failures)
                except redis.ResponseError as exc:
                    if not _group_lost(exc):
                        raise
                    log.warning("consumer group or stream gone, recreating", error=str(exc))
                    self.ctx.broker.join_groups(self.streams, self.ctx.consumer)
        finally:
            # Running trainings finish and settle (within the drain timeout).
            self.slots.drain()
            self.lease.stop()
            self._forget_consumer()
            log.info("worker stopped", consumer=self.ctx.consumer)

    def run_once(self) -> int:
        """One iteration: source batches, process and settle each; returns how many
        entries it settled (failed ones wait for redelivery)."""
        settled = 0
        inline: dict[str, list[Entry]] = {}
        for stream, batch in self.source.next_batches().items():
            if self.slots.handles(stream):
                self.slots.submit(stream, batch)
            else:
                inline[stream] = batch
                # Leased from now, not from its turn: a read of several streams (or
                # priority lanes) hands over batches that wait for one another.
                self.lease.hold(stream, [e.entry_id for e in batch])
        try:
            for stream, batch in inline.items():
                failed = self._process(stream, batch)
                self.lease.release(stream, [e.entry_id for e in batch])
                self.source.schedule_redelivery(stream, failed)
                settled += len(batch) - len(failed)
        finally:
            for stream, batch in inline.items():
                self.lease.release(stream, [e.entry_id for e in batch])
        for done in self.slots.collect():
            self.source.schedule_redelivery(done.stream, done.failed)
            settled += done.size - len(done.failed)
        return settled

    def _process(self, stream: str, batch: list[Entry]) -> list[Entry]:
        """Process and settle one batch (its lease held); returns its failed entries."""
        result = self.processors[stream].process(stream, batch)
        self._settle(result.settlement)
        return result.failed

    def _settle(self, settlement: Settlement) -> None:
        """Finish the batch in Redis; while Redis is away, keep trying rather than redo
        the work (the lease is still held, so nobody else takes the entries meanwhile)."""
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
            except REDIS_UNAVAILABLE as exc:
                if self._signals > 1:
                    raise
                self._backoff(exc, 5)

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
            except REDIS_UNAVAILABLE as exc:
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
        self.ctx.observer.infrastructure_error("redis")

    def _forget_consumer(self) -> None:
        """Leave the groups where this consumer holds nothing, so XINFO stays tidy."""
        try:
            self.ctx.broker.forget_consumer(self.streams, self.ctx.consumer)
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
