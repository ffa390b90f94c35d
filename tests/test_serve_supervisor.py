"""``forge serve --workers N``: when uvicorn's supervisor replaces or retires a worker,
the dead worker's gauges leave /metrics and its counters stay. The workers are stand-ins
for uvicorn's processes; their metric files are real, written by processes that have
exited (as a dead worker's are)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from prometheus_client import Gauge
from uvicorn.supervisors import multiprocess

from forge.observability.metrics import Metrics, prepare_multiprocess_dir, render_multiprocess
from forge.serving.server import _Supervisor
from tests.test_observability import _families, _run_child

_WORKER = """
    import os
    from forge.observability.metrics import Metrics
    m = Metrics(gpu=False)
    m.serving.predictions_total.labels(model="m", variant="champion").inc()
    m.serving.online_accuracy.labels(model="m", variant="champion").set({accuracy})
    m.events_in_progress.labels(stream="predict-requests").inc()
    print(os.getpid())
"""
ACCURACY = ("forge_online_accuracy", (("model", "m"), ("variant", "champion")))
IN_PROGRESS = ("forge_events_in_progress", (("stream", "predict-requests"),))
PREDICTIONS = ("forge_predictions_total", (("model", "m"), ("variant", "champion")))


class StandIn:
    """What uvicorn's supervisor asks of a worker process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.alive = True
        self.exitcode: int | None = None

    def is_alive(self, timeout: float = 5) -> bool:
        return self.alive

    def start(self) -> None:
        pass

    def kill(self) -> None:
        self.alive = False

    def terminate(self) -> None:
        self.alive = False

    def join(self) -> None:
        self.exitcode = -signal.SIGKILL


@pytest.fixture
def supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Supervisor]:
    """A supervisor of two workers whose metric files exist; it starts stand-ins."""
    metrics_dir = prepare_multiprocess_dir(tmp_path / "metrics")
    # The one that dies wrote last, so its accuracy is the most recent.
    live, dead = (_run_child(_WORKER.format(accuracy=v), metrics_dir) for v in (0.75, 0.25))
    started = iter([int(dead), int(live), *range(4_000_001, 4_000_010)])
    monkeypatch.setattr(multiprocess, "Process", lambda config, sockets: StandIn(next(started)))
    handlers = {sig: signal.getsignal(sig) for sig in multiprocess.SIGNALS}
    made = _Supervisor(uvicorn.Config("x:app", workers=2), [], metrics_dir)
    try:
        made.init_processes()
        yield made
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def scrape(made: _Supervisor) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in _families(render_multiprocess(made._metrics_dir)[0]).values():
        samples.update(family)
    return samples


def test_a_dead_serving_workers_gauges_leave_the_metrics_and_its_counters_stay(
    supervisor: _Supervisor,
) -> None:
    before = scrape(supervisor)
    assert before[ACCURACY] == 0.25
    assert before[IN_PROGRESS] == 2
    dead = supervisor.processes[0]
    assert isinstance(dead, StandIn)
    dead.alive = False

    supervisor.keep_subprocess_alive()  # uvicorn replaces it under a new pid

    assert supervisor.processes[0].pid != dead.pid
    after = scrape(supervisor)
    assert after[ACCURACY] == 0.75  # the live worker's
    assert after[IN_PROGRESS] == 1
    assert after[PREDICTIONS] == 2  # counters of the dead are kept

    # A worker retired by SIGTTOU (the last one: the live one) leaves too.
    supervisor.signal_queue.append(signal.SIGTTOU)
    supervisor.handle_signals()
    assert [p.pid for p in supervisor.processes] == [4_000_001]
    gone = scrape(supervisor)
    assert ACCURACY not in gone
    assert gone.get(IN_PROGRESS, 0) == 0
    assert gone[PREDICTIONS] == 2


def test_every_gauge_drops_a_dead_process_in_multiprocess_mode() -> None:
    metrics = Metrics(gpu=False)
    gauges = [c for c in metrics.registry._collector_to_names if isinstance(c, Gauge)]
    assert gauges
    for gauge in gauges:
        assert gauge._multiprocess_mode.startswith("live"), gauge._name
