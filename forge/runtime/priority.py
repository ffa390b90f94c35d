"""Which priority lane a worker takes its next entry from.

A prioritized input stream (``training-requests``) is three streams, its lanes:
``<stream>:high``, ``<stream>`` itself (``normal``, so a plain ``XADD`` to it keeps
working) and ``<stream>:low``. A worker with room for one more entry takes the head (the
oldest entry its group has not delivered) of the best lane:

* a lane's rank is its priority, 0 for high, 1 for normal, 2 for low;
* its head's waiting time lowers that rank by one for each ``aging_s`` it has waited,
  down to 0: a low request waiting ``aging_s`` competes as normal, ``2 x aging_s`` as
  high (aging), so a low request is never starved, whatever keeps arriving above it;
* the lowest rank wins; between equal ranks, the head that arrived first.

Only lanes with a waiting head take part: a low request runs at once when nothing
else waits. Waiting times are taken on Redis's clock against the entry ids, so workers
with skewed clocks agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def lane_order(
    lanes: Sequence[str], heads: Mapping[str, float], now_s: float, aging_s: float
) -> list[str]:
    """The lanes with a waiting head, best first. ``lanes`` is highest priority first;
    ``heads`` gives each waiting head's arrival time (Unix seconds)."""

    def key(lane: str) -> tuple[int, float]:
        rank, arrived_s = lanes.index(lane), heads[lane]
        raised = int(max(now_s - arrived_s, 0.0) // aging_s) if aging_s > 0 else 0
        return max(rank - raised, 0), arrived_s

    return sorted((lane for lane in lanes if lane in heads), key=key)
