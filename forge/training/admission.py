"""GPU admission: a training starts on a GPU only when its memory need fits there.

Before a training that can use a GPU starts, its trainer estimates the memory it needs
(``Trainer.gpu_memory_bytes``; the classifier's formula is in ``forge.training.classifier``)
and ``GpuAdmission.place`` compares it, plus ``FORGE_GPU_ADMISSION_HEADROOM`` (the CUDA
context, the allocator's slack), with each GPU's free memory as NVML reports it, less
what this process has already admitted there and not yet released. NVML's figure
includes the memory those trainings already use, so a worker counts its own trainings
twice: conservative on purpose, as two admissions made at the same moment see the same
free figure. Across workers NVML's free figure is the arbiter.

The GPU with the most room that fits takes the training. When none fits, the training
waits: it polls again every ``FORGE_GPU_ADMISSION_POLL_S``, holding its delivery (the
runtime keeps renewing the entry's lease, and nothing counts as a failed delivery),
with a warning in the log and ``forge_training_admission_waits_total`` counting each
wait. With ``FORGE_GPU_ADMISSION_CPU_FALLBACK`` it runs on the CPU at once instead
(``forge_training_cpu_fallbacks_total``).

Where NVML is unavailable (no driver, no GPU) or torch sees no CUDA device, there is
nothing to admit: the trainer picks its own device, which is then the CPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog

from forge.observability.nvml import Nvml
from forge.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AdmissionWait:
    """Why a training is not admitted yet: its need, and the most room any GPU has."""

    model: str
    need_bytes: int
    headroom_bytes: int
    free_bytes: int
    gpus: int
    since_s: float  # Unix time the wait began


class AdmissionObserver(Protocol):
    def waiting(self, wait: AdmissionWait) -> None:
        """The training does not fit on any GPU now; it waits (called on every poll)."""

    def admitted(self, model: str, device: str, waited_s: float) -> None:
        """The training got ``device`` (``cuda:N``, or ``cpu`` by fallback)."""


class _Quiet:
    def waiting(self, wait: AdmissionWait) -> None:
        pass

    def admitted(self, model: str, device: str, waited_s: float) -> None:
        pass


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class GpuAdmission:
    """Admits trainings to GPUs of this machine; one per worker process."""

    def __init__(
        self,
        settings: Settings,
        *,
        nvml: Any = None,
        cuda_available: Callable[[], bool] = _cuda_available,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``nvml`` replaces the ``pynvml`` module, ``sleep`` the wait between polls
        (tests)."""
        self._headroom_bytes = settings.gpu_admission_headroom_bytes
        self._poll_s = settings.gpu_admission_poll_s
        self._cpu_fallback = settings.gpu_admission_cpu_fallback
        self._nvml_start = Nvml(nvml, "GPU admission")
        self._nvml: Any = None
        self._cuda_available = cuda_available
        self._sleep = sleep
        self._state: Literal["new", "ready", "unavailable"] = "new"
        self._reserved: dict[int, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def place(
        self, model: str, need_bytes: int | None, observer: AdmissionObserver | None = None
    ) -> Iterator[str | None]:
        """The device a training of ``model`` runs on, reserved for the block: ``cuda:N``,
        ``cpu`` (fallback), or None when there is no GPU to admit to (``need_bytes`` None:
        the trainer uses none). Waits, polling, while the training fits nowhere."""
        watch = observer or _Quiet()
        if need_bytes is None or not self._usable():
            yield None
            return
        since_s = time.time()
        while True:
            index, free = self._reserve(need_bytes)
            if index is not None:
                device = f"cuda:{index}"
                break
            wait = AdmissionWait(
                model, need_bytes, self._headroom_bytes, free, self._gpu_count(), since_s
            )
            if self._cpu_fallback:
                log.warning("training fits on no GPU, running it on the CPU", **_fields(wait))
                watch.admitted(model, "cpu", time.time() - since_s)
                yield "cpu"
                return
            log.warning("training waits for GPU memory", **_fields(wait))
            watch.waiting(wait)
            self._sleep(self._poll_s)
        watch.admitted(model, device, time.time() - since_s)
        log.info("training admitted to a GPU", model=model, device=device, need_bytes=need_bytes)
        try:
            yield device
        finally:
            with self._lock:
                self._reserved[index] -= need_bytes

    def free_bytes(self) -> list[int]:
        """Free memory of each GPU by NVML, less this process's reservations."""
        with self._lock:
            return self._free_locked()

    # ------------------------------------------------------------------ helpers

    def _reserve(self, need_bytes: int) -> tuple[int | None, int]:
        """The GPU with the most room that fits ``need_bytes`` (reserved), or None; and
        the most room any GPU has."""
        with self._lock:
            free = self._free_locked()
            best = max(range(len(free)), key=lambda i: free[i], default=None)
            if best is None:
                return None, 0
            if free[best] < need_bytes + self._headroom_bytes:
                return None, free[best]
            self._reserved[best] = self._reserved.get(best, 0) + need_bytes
            return best, free[best]

    def _free_locked(self) -> list[int]:
        nvml = self._nvml
        free = []
        for index in range(nvml.nvmlDeviceGetCount()):
            memory = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
            free.append(max(int(memory.free) - self._reserved.get(index, 0), 0))
        return free

    def _gpu_count(self) -> int:
        with self._lock:
            return int(self._nvml.nvmlDeviceGetCount())

    def _usable(self) -> bool:
        """NVML answers, lists a GPU, and torch can use CUDA; decided once."""
        with self._lock:
            if self._state == "new":
                self._nvml = self._nvml_start.get()
                usable = self._nvml is not None and self._gpus_and_cuda(self._nvml)
                self._state = "ready" if usable else "unavailable"
            return self._state == "ready"

    def _gpus_and_cuda(self, nvml: Any) -> bool:
        try:
            return int(nvml.nvmlDeviceGetCount()) > 0 and self._cuda_available()
        except Exception as exc:  # NVML started, yet cannot count: nothing to admit to
            log.debug("no GPU admission: NVML lists no GPU", error=type(exc).__name__)
            return False


def _fields(wait: AdmissionWait) -> dict[str, Any]:
    return {
        "model": wait.model,
        "need_bytes": wait.need_bytes,
        "headroom_bytes": wait.headroom_bytes,
        "free_bytes": wait.free_bytes,
        "gpus": wait.gpus,
        "waited_s": round(time.time() - wait.since_s, 1),
    }
