"""Micro-batching: concurrent requests share one ``engine.predict`` call.

A batch closes when it holds ``max_rows`` inputs or ``max_wait_s`` after its first
call arrived, whichever comes first; a call that would overflow it opens the next
one, and a call larger than ``max_rows`` alone runs alone. Batches run one at a time
on one worker thread (model calls are serialized; the event loop stays free), and
calls that arrive meanwhile wait for the next batch, so a busy engine batches more.
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


class MicroBatcher:
    def __init__(self, predict: Predict, *, max_rows: int, max_wait_s: float) -> None:
        self._predict = predict
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._held: _Pending | None = None  # the call that did not fit the last batch
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
            _fail([self._queue.get_nowait()], "the server is stopping")
        self._executor.shutdown(wait=True)

    async def submit(self, call: PredictCall) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
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
        joins it before it is full or its wait is over."""
        first = self._held or await self._queue.get()
        self._held = None
        batch, rows = [first], len(first[0].inputs)
        deadline_s = first[0].arrived_s + self.max_wait_s
        while rows < self.max_rows:
            item = self._queue.get_nowait() if not self._queue.empty() else None
            if item is None:
                item = await self._wait(deadline_s - time.perf_counter())
            if item is None:
                break
            if rows + len(item[0].inputs) > self.max_rows:
                self._held = item
                break
            batch.append(item)
            rows += len(item[0].inputs)
        return batch

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
