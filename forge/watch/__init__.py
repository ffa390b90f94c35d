"""``forge watch``: a live terminal view of completions, throughput, lag and trainings.

``collect`` reads a snapshot from Redis; ``render`` draws one, with no I/O of its own.
"""

from forge.watch.collect import WatchData, WatchOptions, collect
from forge.watch.render import render

__all__ = ["WatchData", "WatchOptions", "collect", "render"]
