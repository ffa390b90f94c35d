"""Micro-batching: concurrent requests share one ``engine.predict`` call.

A batch closes when it holds ``max_rows`` inputs, ``max_wait_s`` after its first call
arrived, or as soon as no other call is on its way, whichever comes first; a call that
would overflow it opens the next one, and a call larger than ``max_rows`` alone runs
alone. "On its way" is a request the server has begun to read (``expect``): waiting
for calls nobody has sent would only add the wait to every answer, as at a handful
of connections each waiting for its own answer before it sends again.

Batches run one at a time on one worker thread (model calls are serialized; the event
loop stays free), and calls that arrive meanwhile wait for the next batch, so a busy
engine batches more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from forge.serving.calls import FAILED, PredictAnswer, PredictCall, PredictError

log = structlog.get_logger(__name__)

Result = PredictAnswer | PredictError
Predict = Callable[[Sequence[PredictCall]], list[Result]]
_Pending = tuple[PredictCall, "asyncio.Future[Result]"]
# Queued by ``abandon``: an expected call will not come, the open batch need not wait.
_RECHECK = None


class MicroBatcher:
    def __init__(self, predict: Predict, *, max_rows: int, max_wait_s: float) -> None:
        self._predict = predict
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._held: _Pending | None = None  # the call that did not fit the last batch
        self._expected = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="forge-predict")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start batching; call from the event loop the requests arrive on."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="forge-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                _fail([item], "the server is stopping")
        self._executor.shutdown(wait=True)

    def expect(self) -> None:
        """A call is on its way (its request is being read): an open batch may wait
        for it, within ``max_wait_s``. It comes with ``submit(..., expected=True)``, or
        ``abandon`` says it will not."""
        self._expected += 1

    def abandon(self) -> None:
        self._expected -= 1
        self._queue.put_nowait(_RECHECK)

    async def submit(self, call: PredictCall, *, expected: bool = False) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if expected:
            self._expected -= 1
        self._queue.put_nowait((call, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._predict, [call for call, _ in batch]
                )
            except Exception:
                log.exception("prediction batch failed")
                _fail(batch, "prediction failed")
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # its request may have been cancelled
                    future.set_result(result)

    async def _collect(self) -> list[_Pending]:
        """The next batch: the held-over call or the next to arrive, then whatever
        joins it before it is full, its wait is over, or nothing more is on its way."""
        first = self._held or await self._next()
        self._held = None
        batch, rows = [first], len(first[0].inputs)
        deadline_s = first[0].arrived_s + self.max_wait_s
        while rows < self.max_rows:
            item = self._queue.get_nowait() if not self._queue.empty() else _RECHECK
            if item is _RECHECK:
                if self._expected <= 0:
                    break
                item = await self._wait(deadline_s - time.perf_counter())
                if item is None:  # waited long enough, or an expected call was abandoned
                    if time.perf_counter() >= deadline_s:
                        break
                    continue
            if rows + len(item[0].inputs) > self.max_rows:
                self._held = item
                break
            batch.append(item)
            rows += len(item[0].inputs)
        return batch

    async def _next(self) -> _Pending:
        while True:
            item = await self._queue.get()
            if item is not None:
                return item

    async def _wait(self, timeout_s: float) -> _Pending | None:
        if timeout_s <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None


def _fail(batch: Sequence[_Pending], message: str) -> None:
    for _, future in batch:
        if not future.done():
            future.set_result(PredictError(message, FAILED))
