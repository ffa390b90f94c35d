"""Waiting for the completions of events one has just published (``forge publish --wait``).

Take ``completions_position`` before publishing, so that no completion can slip past,
then ``wait_for_completions`` reads the completions stream from there and matches each
completion to a published entry by source stream and entry id, the event id confirming
it. The entry id, not the event id, is the key: an event id published twice (a retry,
a replay) has one completion per entry. The stream is part of the key because the
priority lanes of one stream hand out entry ids independently. With partitions, each
partition's completions stream is read (an entry's completion is in its partition's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from forge.errors import ForgeError, InvalidEvent
from forge.events import EVENT_FIELD, Completion, Decoder
from forge.runtime.broker import StreamBroker

_READ_COUNT = 100
# One XREAD blocks no longer than this: redis-py's default socket timeout (5 s since
# redis-py 8) would cut a longer block short with a TimeoutError.
_MAX_BLOCK_MS = 1000


class CompletionTimeout(ForgeError):
    """Not every awaited completion arrived in time."""


def completions_position(broker: StreamBroker) -> dict[str, str]:
    """Each completions stream's newest id; everything published later comes after it."""
    return {
        part.completions: broker.newest_completion_id(part) or "0-0" for part in broker.keys.parts
    }


def wait_for_completions(
    broker: StreamBroker,
    published: Mapping[tuple[str, str], str],
    *,
    since: Mapping[str, str],
    timeout_s: float,
    on_completion: Callable[[Completion], None],
) -> list[Completion]:
    """The completions of the ``published`` entries ((stream, entry id) -> event id), in the order
    they arrive, each handed to ``on_completion`` at once; ``CompletionTimeout`` if they
    are not all in after ``timeout_s``."""
    waiting = dict(published)
    arrived: list[Completion] = []
    decoder = Decoder(Completion)
    cursors = dict(since)
    deadline = time.monotonic() + timeout_s
    while waiting:
        # At least 1 ms: a block of 0 would wait for ever.
        block_ms = min(max(int((deadline - time.monotonic()) * 1000), 1), _MAX_BLOCK_MS)
        for stream, entry_id, fields in broker.completions_after(cursors, _READ_COUNT, block_ms):
            cursors[stream] = entry_id
            completion = _decoded(decoder, fields)
            if completion is not None and _settles(completion, waiting):
                del waiting[(completion.source_stream, completion.source_entry_id)]
                arrived.append(completion)
                on_completion(completion)
        if waiting and time.monotonic() >= deadline:
            raise CompletionTimeout(_timeout_message(len(waiting), len(published), timeout_s))
    return arrived


def _decoded(decoder: Decoder[Completion], fields: dict[bytes, bytes]) -> Completion | None:
    payload = fields.get(EVENT_FIELD)
    if payload is None:
        return None
    try:
        return decoder.decode(payload)
    except InvalidEvent:
        return None  # not ours to judge: some other producer wrote it


def _settles(completion: Completion, waiting: Mapping[tuple[str, str], str]) -> bool:
    entry = (completion.source_stream, completion.source_entry_id)
    return waiting.get(entry) == completion.source_id


def _timeout_message(missing: int, total: int, timeout_s: float) -> str:
    which = "the completion" if total == 1 else f"{missing} of {total} completions"
    return (
        f"timed out after {timeout_s:g}s waiting for {which} (is a worker running? "
        "the events stay queued; 'forge status' shows them)"
    )
