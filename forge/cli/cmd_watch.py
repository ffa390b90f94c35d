"""``forge watch``: the live terminal view (``--once`` prints one snapshot for scripts)."""

from __future__ import annotations

import argparse
import io
import sys
import time

import redis
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from forge.keys import Keys
from forge.servers.connect import REDIS_UNAVAILABLE
from forge.servers.endpoints import open_redis
from forge.settings import Settings
from forge.watch import WatchOptions, collect, render

# Wide enough that event ids and errors are not wrapped when output goes to a file or
# a pipe, where rich would otherwise assume 80 columns.
_PIPE_WIDTH = 200


def run_watch(args: argparse.Namespace, settings: Settings) -> int:
    keys = Keys.from_settings(settings)
    options = WatchOptions(rows=args.rows, window_s=args.window_s, stale_s=args.stale_s)
    with open_redis(settings) as (client, _):
        if args.once:
            _print_once(client, keys, options)
            return 0
        return _live(client, keys, options, args.interval_s)


def _print_once(client: redis.Redis, keys: Keys, options: WatchOptions) -> None:
    view = render(collect(client, keys, options), plain=True)
    # Read sys.stdout now, not at import: tests and callers may have replaced it.
    if sys.stdout.isatty():
        Console(file=sys.stdout, highlight=False).print(view)
        return
    # For scripts: no colour codes, and no padding spaces at line ends to trip up diffs.
    buffer = io.StringIO()
    Console(file=buffer, width=_PIPE_WIDTH, color_system=None, highlight=False).print(view)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))


def _live(client: redis.Redis, keys: Keys, options: WatchOptions, interval_s: float) -> int:
    console = Console(highlight=False)
    last: RenderableType = Text("")
    try:
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                last, frame = _frame(client, keys, options, last, interval_s)
                live.update(frame, refresh=True)
                time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how one leaves a live view: not an error


def _frame(
    client: redis.Redis,
    keys: Keys,
    options: WatchOptions,
    last: RenderableType,
    interval_s: float,
) -> tuple[RenderableType, RenderableType]:
    """The new view and the one to fall back on. While Redis is unreachable the last
    good view stays on screen under a warning, and the next refresh tries again."""
    try:
        view = render(collect(client, keys, options))
    except REDIS_UNAVAILABLE as exc:
        warning = Text(f"Redis unreachable ({exc}); retrying every {interval_s:g}s", style="red")
        return last, Group(warning, last)
    return view, view
