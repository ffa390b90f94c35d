"""A stand-in for pynvml: GPUs whose free memory a test sets and changes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

MiB = 2**20


class FakeNvml:
    """Just enough of pynvml: GPUs with the free memory the test sets."""

    def __init__(self, free_bytes: list[int] | None = None, *, fail_init: bool = False) -> None:
        self.free_bytes = list(free_bytes or [])
        self.fail_init = fail_init

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.fail_init:
            raise OSError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.free_bytes)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(free=self.free_bytes[handle], total=16_000 * MiB)
