"""Micro-batching, driven deterministically: an engine that counts its batches and
holds the first one behind a gate, so that what arrives meanwhile is known."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from forge.events import PredictInput
from forge.serving.batcher import MicroBatcher
from forge.serving.calls import PredictAnswer, PredictCall, PredictError

Result = PredictAnswer | PredictError


class GatedEngine:
    """Records each batch (the calls' models); the first batch waits for ``gate``."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def predict(self, calls: Sequence[PredictCall]) -> list[Result]:
        self.batches.append([c.model for c in calls])
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return [PredictAnswer(c.prediction_id, c.model, 1, "champion", []) for c in calls]


def call(name: str, rows: int = 1) -> PredictCall:
    return PredictCall(name, [PredictInput(vector=[0.0])] * rows)


async def settle() -> None:
    """Let every task that is ready run its next step (the submits enqueue)."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_calls_arriving_while_a_batch_runs_share_the_next_one() -> None:
    engine = GatedEngine()

    async def scenario() -> list[Result]:
        batcher = MicroBatcher(engine.predict, max_rows=4, max_wait_s=60.0)
        batcher.start()
        first = asyncio.create_task(batcher.submit(call("a", 4)))  # a full batch: runs now
        assert await asyncio.to_thread(engine.entered.wait, 30)
        # b and c fit one batch; d would overflow it and opens the next; e, larger
        # than a batch, runs alone. No batch waits its 60 s: each closes full or
        # when the call after it does not fit.
        sizes = {"b": 1, "c": 2, "d": 2, "e": 5}
        rest = [asyncio.create_task(batcher.submit(call(n, r))) for n, r in sizes.items()]
        await settle()
        engine.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return list(results)

    results = asyncio.run(scenario())
    assert engine.batches == [["a"], ["b", "c"], ["d"], ["e"]]
    assert [r.model for r in results if isinstance(r, PredictAnswer)] == list("abcde")


def test_a_batch_waits_for_expected_calls_and_closes_as_soon_as_it_is_full() -> None:
    engine = GatedEngine()
    engine.gate.set()

    async def scenario() -> list[Result]:
        batcher = MicroBatcher(engine.predict, max_rows=3, max_wait_s=60.0)
        batcher.start()
        batcher.expect()  # b's request is being read
        batcher.expect()  # and c's
        first = asyncio.create_task(batcher.submit(call("a")))
        await settle()  # a's batch is open, waiting for b and c
        assert engine.batches == []
        later = [asyncio.create_task(batcher.submit(call(n), expected=True)) for n in "bc"]
        results = await asyncio.gather(first, *later)
        await batcher.close()
        return list(results)

    results = asyncio.run(scenario())
    assert engine.batches == [["a", "b", "c"]]
    assert [r.model for r in results if isinstance(r, PredictAnswer)] == list("abc")


def test_a_batch_waits_for_nobody_when_no_call_is_on_its_way() -> None:
    engine = GatedEngine()
    engine.gate.set()

    async def scenario() -> None:
        batcher = MicroBatcher(engine.predict, max_rows=32, max_wait_s=60.0)
        batcher.start()
        await batcher.submit(call("a"))  # would take 60 s if the batch waited
        batcher.expect()
        waiting = asyncio.create_task(batcher.submit(call("b")))
        await settle()
        assert engine.batches == [["a"]]  # b's batch waits for the expected call
        batcher.abandon()  # which will not come: b goes now
        await waiting
        await batcher.close()

    asyncio.run(scenario())
    assert engine.batches == [["a"], ["b"]]


def test_without_a_wait_a_lone_call_runs_at_once() -> None:
    engine = GatedEngine()
    engine.gate.set()

    async def scenario() -> Result:
        batcher = MicroBatcher(engine.predict, max_rows=32, max_wait_s=0.0)
        batcher.start()
        result = await batcher.submit(call("a"))
        await batcher.close()
        return result

    assert isinstance(asyncio.run(scenario()), PredictAnswer)
    assert engine.batches == [["a"]]


def test_an_engine_failure_fails_its_batch_and_the_next_batch_runs() -> None:
    seen: list[int] = []

    def predict(calls: Sequence[PredictCall]) -> list[Result]:
        seen.append(len(calls))
        if len(seen) == 1:
            raise RuntimeError("a bug")
        return [PredictAnswer(c.prediction_id, c.model, 1, "champion", []) for c in calls]

    async def scenario() -> list[Result]:
        batcher = MicroBatcher(predict, max_rows=1, max_wait_s=0.0)
        batcher.start()
        results = [await batcher.submit(call("a")), await batcher.submit(call("b"))]
        await batcher.close()
        return results

    failed, answered = asyncio.run(scenario())
    assert isinstance(failed, PredictError)
    assert failed.status == 503
    assert isinstance(answered, PredictAnswer)
