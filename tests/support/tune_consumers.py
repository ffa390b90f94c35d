"""A consumer registration for the hyperparameter-search test that kills a worker in
the middle of a trial (see tests/test_tuning.py)."""

from __future__ import annotations

import os
import signal
from typing import Any

from forge.runtime.context import Context
from forge.runtime.handlers import HandlerRegistry


def register_killed_in_a_trial(registry: HandlerRegistry, ctx: Context) -> None:
    """Forge's real handlers, in a process that SIGKILLs itself once its first trial
    has started (its study run and trial run exist, the trial is RUNNING and beating)."""
    from consumers import register
    from forge.training.tuning import trial

    def killed(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)

    trial._train = killed  # type: ignore[assignment]
    register(registry, ctx)
