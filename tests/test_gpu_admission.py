"""GPU admission with a stand-in NVML: a training that fits starts on the GPU with the
most room, one that does not waits (leased, not a failed delivery) or falls back to the
CPU, and the wait shows in the metrics, the log and ``forge status``'s key."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import msgspec
import numpy as np
import pytest

from consumers.training import AdmissionReport, AdmissionWaitRecord
from forge.events import TrainingRequest
from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry, HandlerSpec, Message, Succeeded
from forge.runtime.worker import Worker
from forge.settings import Settings
from forge.training.admission import AdmissionWait, GpuAdmission
from forge.training.base import Dataset
from forge.training.classifier import ClassifierTrainer, memory_need_bytes
from tests.support.events import publish
from tests.support.metrics import sample
from tests.support.nvml import FakeNvml, MiB
from tests.support.redis_helpers import running, wait_for
from tests.support.workers import completions


class Heard:
    def __init__(self) -> None:
        self.waits: list[AdmissionWait] = []
        self.placed: list[tuple[str, str]] = []

    def waiting(self, wait: AdmissionWait) -> None:
        self.waits.append(wait)

    def admitted(self, model: str, device: str, waited_s: float) -> None:
        self.placed.append((model, device))


def admission(settings: Settings, nvml: FakeNvml, **kwargs: Any) -> GpuAdmission:
    return GpuAdmission(settings, nvml=nvml, cuda_available=lambda: True, **kwargs)


@pytest.fixture
def gpu_settings() -> Settings:
    return Settings(gpu_admission_headroom_bytes=100 * MiB, gpu_admission_poll_s=7.0)


def test_a_training_that_fits_goes_to_the_gpu_with_most_room(gpu_settings: Settings) -> None:
    gate = admission(gpu_settings, FakeNvml([500 * MiB, 2000 * MiB]))
    with gate.place("m", 1000 * MiB) as device:
        assert device == "cuda:1"
        # Reserved until the training ends, on top of what NVML says.
        assert gate.free_bytes() == [500 * MiB, 1000 * MiB]
    assert gate.free_bytes() == [500 * MiB, 2000 * MiB]


def test_admissions_at_once_cannot_both_take_the_same_memory(gpu_settings: Settings) -> None:
    """NVML still shows 1500 MiB free while the first training has not allocated yet:
    its reservation keeps the second one waiting until the first ends."""
    first_done = threading.Event()
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        first_done.wait(30)

    gate = admission(gpu_settings, FakeNvml([1500 * MiB]), sleep=sleep)
    heard = Heard()
    devices: list[str | None] = []

    def second() -> None:
        with gate.place("second", 1000 * MiB, heard) as device:
            devices.append(device)

    thread = threading.Thread(target=second)
    with gate.place("first", 1000 * MiB) as first:
        assert first == "cuda:0"
        thread.start()
        wait_for(lambda: len(heard.waits) == 1, timeout_s=10)
    first_done.set()
    thread.join(10)
    assert devices == ["cuda:0"]
    assert heard.waits[0].need_bytes == 1000 * MiB
    assert heard.waits[0].free_bytes == 500 * MiB
    assert polls == [7.0]


def test_a_training_that_does_not_fit_waits_polling_then_runs(
    gpu_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    nvml = FakeNvml([300 * MiB])
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:  # another process freed its memory meanwhile
            nvml.free_bytes = [4000 * MiB]

    heard = Heard()
    gate = admission(gpu_settings, nvml, sleep=sleep)
    with gate.place("m", 1000 * MiB, heard) as device:
        assert device == "cuda:0"
    assert polls == [7.0, 7.0, 7.0]
    assert len(heard.waits) == 3
    assert heard.placed == [("m", "cuda:0")]
    waits = [r for r in caplog.records if "training waits for GPU memory" in str(r.msg)]
    assert len(waits) == 3
    assert waits[0].levelname == "WARNING"
    assert "'need_bytes': 1048576000" in str(waits[0].msg)


def test_with_cpu_fallback_a_training_that_does_not_fit_runs_on_the_cpu(
    gpu_settings: Settings,
) -> None:
    settings = gpu_settings.replace(gpu_admission_cpu_fallback=True)
    heard = Heard()
    gate = admission(settings, FakeNvml([300 * MiB]), sleep=lambda s: pytest.fail("waited"))
    with gate.place("m", 1000 * MiB, heard) as device:
        assert device == "cpu"
    assert heard.placed == [("m", "cpu")]
    assert heard.waits == []


@pytest.mark.parametrize(
    ("nvml", "cuda", "need"),
    [
        (FakeNvml(fail_init=True), True, 1),  # no driver
        (FakeNvml([]), True, 1),  # no GPU
        (FakeNvml([10 * MiB]), False, 1),  # torch without CUDA
        (FakeNvml([10 * MiB]), True, None),  # a task that uses no GPU
    ],
)
def test_without_a_usable_gpu_there_is_nothing_to_admit(
    gpu_settings: Settings, nvml: FakeNvml, cuda: bool, need: int | None
) -> None:
    gate = GpuAdmission(gpu_settings, nvml=nvml, cuda_available=lambda: cuda)
    with gate.place("m", need) as device:
        assert device is None


def test_the_classifier_estimates_parameters_optimizer_state_and_activations() -> None:
    # 64-d inputs, 256 hidden, 10 classes, batches of 64.
    params = 64 * 256 + 256 + 256 * 10 + 10
    step = 2 * 4 * 64 * (64 + 3 * 256 + 2 * 10)
    evaluation = 4 * 8192 * (64 + 256 + 10)
    assert memory_need_bytes(64, 256, 10, 64) == 18 * params + max(step, evaluation)
    # Large batches: the training step's activations dominate.
    assert memory_need_bytes(64, 256, 10, 100_000) == 18 * params + 2 * 4 * 100_000 * 852
    vectors = np.zeros((30, 64), dtype=np.float32)
    data = Dataset([f"r{i}" for i in range(30)], vectors, [{"y": i % 10} for i in range(30)])
    need = ClassifierTrainer().gpu_memory_bytes(data, {"label_field": "y", "hidden_dim": 256})
    assert need == memory_need_bytes(64, 256, 10, 64)


# ---------------------------------------------------------------------- in a worker


def test_a_waiting_training_keeps_its_delivery_and_lease_then_runs(ctx: Context) -> None:
    """The runtime's view: the handler blocks in admission; the entry stays pending on
    its first delivery, leased, with the wait in the metrics and in Redis; once memory
    frees up it runs and succeeds on that same delivery."""
    nvml = FakeNvml([200 * MiB])
    polled = threading.Event()
    freed = threading.Event()

    def sleep(seconds: float) -> None:
        polled.set()
        freed.wait(30)

    settings = ctx.settings.replace(gpu_admission_headroom_bytes=0, gpu_admission_poll_s=1.0)
    ctx = replace(ctx, settings=settings)
    gate = admission(settings, nvml, sleep=sleep)
    devices: list[str | None] = []

    def handle(messages: Sequence[Message[TrainingRequest]]) -> list[Succeeded]:
        (message,) = messages
        report = AdmissionReport(ctx, message)
        with gate.place(message.event.model, 1000 * MiB, report) as device:
            devices.append(device)
        return [Succeeded({"device": device})]

    registry = HandlerRegistry()
    registry.register(
        HandlerSpec("training-requests", TrainingRequest, handle, max_batch_size=1, concurrency=2)
    )
    worker = Worker(ctx, registry)
    worker.ctx.broker.ensure_groups(worker.streams)
    entry_id = publish(ctx.redis, ctx.keys.training_requests, _request("r1"))
    key = ctx.keys.admission_wait(ctx.keys.training_requests, entry_id)
    with running(worker):
        wait_for(polled.is_set, timeout_s=10)
        assert worker.lease.held() == {ctx.keys.training_requests: [entry_id]}
        (pending,) = ctx.redis.xpending_range(
            ctx.keys.training_requests, ctx.keys.group, "-", "+", 10
        )
        assert pending["times_delivered"] == 1
        record = msgspec.json.decode(ctx.redis.get(key), type=AdmissionWaitRecord)
        assert (record.model, record.need_bytes, record.free_bytes) == ("m", 1000 * MiB, 200 * MiB)
        assert record.worker == ctx.consumer
        assert sample(ctx.metrics, "forge_training_admission_waiting", model="m") == 1
        assert completions(ctx) == []
        nvml.free_bytes = [2000 * MiB]
        freed.set()
        wait_for(lambda: len(completions(ctx)) == 1, timeout_s=10)
    (done,) = completions(ctx)
    assert done.status == "succeeded"
    assert done.deliveries == 1
    assert done.result == {"device": "cuda:0"}
    assert ctx.redis.exists(key) == 0
    assert sample(ctx.metrics, "forge_training_admission_waits_total", model="m") >= 1
    assert sample(ctx.metrics, "forge_training_admission_waiting", model="m") == 0


def _request(event_id: str) -> dict[str, object]:
    return {
        "type": "training-request",
        "id": event_id,
        "model": "m",
        "task": "classifier",
        "collection": "c",
    }


def test_a_training_that_fails_while_waiting_no_longer_counts_as_waiting(ctx: Context) -> None:
    def sleep(seconds: float) -> None:
        raise OSError("GPU has fallen off the bus")

    gate = admission(ctx.settings, FakeNvml([100 * MiB]), sleep=sleep)
    event = TrainingRequest(id="r1", model="m", task="classifier", collection="c")
    message = Message(event, ctx.keys.training_requests, "1-0", 1)
    key = ctx.keys.admission_wait(ctx.keys.training_requests, "1-0")
    with (
        pytest.raises(OSError, match="fallen off"),
        AdmissionReport(ctx, message) as report,
        gate.place("m", 1000 * MiB, report),
    ):
        pytest.fail("admitted")
    assert sample(ctx.metrics, "forge_training_admission_waits_total", model="m") == 1
    assert sample(ctx.metrics, "forge_training_admission_waiting", model="m") == 0
    assert ctx.redis.exists(key) == 0
