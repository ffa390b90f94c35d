"""NVML (``pynvml``), initialised on first use and tried once.

GPUs do not appear in a running process, so a failed start (no driver, no GPU) is not
retried: retrying would cost a failed library load and a log line on every use. GPU
metrics and GPU admission each hold one.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import structlog

log = structlog.get_logger(__name__)


class Nvml:
    def __init__(self, module: Any = None, purpose: str = "GPU") -> None:
        """``module`` replaces the ``pynvml`` module (tests); ``purpose`` names what goes
        without NVML in the one debug line a failed start logs."""
        self._module = module
        self._purpose = purpose
        self._state: Literal["new", "ready", "unavailable"] = "new"
        self._lock = threading.Lock()

    def get(self) -> Any | None:
        """The initialised module, or None where NVML cannot start."""
        with self._lock:
            if self._state == "new":
                self._state = "unavailable"
                try:
                    if self._module is None:
                        import pynvml

                        self._module = pynvml
                    self._module.nvmlInit()
                    self._state = "ready"
                except Exception as exc:
                    log.debug(f"no {self._purpose}: NVML unavailable", error=type(exc).__name__)
            return self._module if self._state == "ready" else None
