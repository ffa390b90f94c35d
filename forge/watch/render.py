"""Drawing ``forge watch``: a pure function from a ``WatchData`` to a rich renderable.

No Redis and no clock in here (ages are taken against ``WatchData.now_s``), so the view
is tested by rendering a hand-made snapshot to a string.
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from forge.cli.output import human_duration
from forge.observability.training_queue import TrainingQueue
from forge.watch.collect import CompletionRow, TrainingRow, WatchData

STATUS_STYLES = {"succeeded": "green", "failed": "yellow", "dead-lettered": "red"}
PRIORITY_STYLES = {"high": "bold", "low": "dim"}
_BAR_WIDTH = 24


def render(data: WatchData, *, plain: bool = False) -> RenderableType:
    """The whole view. ``plain`` draws for scripts and logs: light table rules and text
    progress bars instead of the terminal widgets."""
    frame = box.SIMPLE if plain else box.ROUNDED
    return Group(
        summary(data),
        Text(""),
        streams_table(data, frame),
        trainings_table(data, frame, plain=plain),
        queue_table(data.queue, frame),
        completions_table(data, frame),
    )


def summary(data: WatchData) -> Text:
    rate = data.throughput
    line = Text()
    line.append("forge watch", style="bold")
    line.append(f"  {_clock(data.now_s)}   throughput ")
    line.append(f"{rate.per_s:.1f} completions/s", style="bold")
    line.append(f" ({rate.count} in {human_duration(rate.span_s)}")
    for index, (status, count) in enumerate(sorted(rate.by_status.items())):
        line.append(", " if index else ": ")
        line.append(f"{count} {status}", style=STATUS_STYLES.get(status, ""))
    line.append(")")
    depth = data.status.dead_letter_depth
    line.append("   dead letters: ")
    line.append(str(depth), style="bold red" if depth else "")
    line.append(f" (replays {data.status.dead_letter_replays})")
    return line


def streams_table(data: WatchData, frame: box.Box) -> Table:
    table = Table(title=f"input streams (group {data.group})", box=frame, title_justify="left")
    for name in ("stream", "length", "lag", "pending", "consumers"):
        table.add_column(name, justify="left" if name == "stream" else "right")
    for stream in data.status.streams:
        group = stream.group(data.group)
        lag = "-" if group is None or group.lag is None else str(group.lag)
        table.add_row(
            *_cells(
                stream.stream,
                str(stream.length),
                lag,
                str(group.pending) if group else "-",
                str(group.consumers) if group else "-",
            )
        )
    return table


def trainings_table(data: WatchData, frame: box.Box, *, plain: bool) -> RenderableType:
    if not data.trainings:
        return Text("running trainings: none\n", style="dim")
    table = Table(title="running trainings", box=frame, title_justify="left")
    for name in ("model", "event id", "progress", "epoch", "loss", "metric", "eta", "updated"):
        table.add_column(name, justify="right" if name in ("loss", "metric", "eta") else "left")
    for row in data.trainings:
        bar = (
            Text(_text_bar(row)) if plain else ProgressBar(row.epochs, row.epoch, width=_BAR_WIDTH)
        )
        table.add_row(
            *_cells(row.model, row.source_id),
            bar,
            *_cells(
                f"{row.epoch}/{row.epochs}",
                f"{row.loss:.4f}",
                "-" if row.metric is None else f"{row.metric:.4f}",
                "-" if row.eta_s is None else human_duration(row.eta_s),
                f"{human_duration(max(data.now_s - row.updated_s, 0.0))} ago",
            ),
        )
    return table


def queue_table(queue: TrainingQueue, frame: box.Box) -> RenderableType:
    """Training requests queued and held, with priority and how long ago queued."""
    counts = ", ".join(f"{n} {priority}" for priority, n in queue.queued.items())
    title = f"training queue ({counts or 'nothing'} queued)"
    if not queue.trainings:
        return Text(f"{title}: empty\n", style="dim")
    table = Table(title=title, box=frame, title_justify="left")
    for name in ("priority", "state", "model", "event id", "queued for", "worker", "detail"):
        table.add_column(name, justify="right" if name == "queued for" else "left")
    for row in queue.trainings:
        table.add_row(
            Text(row.priority, style=PRIORITY_STYLES.get(row.priority, "")),
            *_cells(
                row.state,
                row.model,
                row.event_id,
                human_duration(row.waiting_s),
                row.worker or "-",
                row.detail,
            ),
        )
    return table


def completions_table(data: WatchData, frame: box.Box) -> RenderableType:
    if not data.completions:
        return Text("completions: none yet", style="dim")
    table = Table(title="completions (newest first)", box=frame, title_justify="left")
    for name in (
        "time",
        "stream",
        "event id",
        "status",
        "deliveries",
        "handler",
        "worker",
        "error",
    ):
        table.add_column(name, justify="right" if name in ("deliveries", "handler") else "left")
    for row in data.completions:
        table.add_row(
            *_cells(_clock(row.at_s), row.source_stream, row.source_id),
            _status(row),
            *_cells(str(row.deliveries), human_duration(row.handler_s), row.worker),
            Text(row.error, overflow="ellipsis", no_wrap=True),
        )
    return table


def _cells(*values: str) -> list[Text]:
    """Cells as Text: a plain string would be parsed as rich markup, and ids, worker
    names and error messages are other people's data (``[bold]`` must print as is)."""
    return [Text(value) for value in values]


def _status(row: CompletionRow) -> Text:
    label = f"{row.status} (dup)" if row.duplicate else row.status
    return Text(label, style=STATUS_STYLES.get(row.status, ""))


def _text_bar(row: TrainingRow) -> str:
    filled = round(row.fraction * _BAR_WIDTH)
    return f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {row.fraction:4.0%}"


def _clock(at_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at_s))
