"""The handler contract and the ``HandlerRegistry`` consumers register their handlers in.

``forge`` never imports ``consumers``: a consumer package exposes a ``register``
function, named by the ``forge.consumers`` entry point (or ``--consumers`` on the
command line), and that function adds its handlers to a ``HandlerRegistry``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import msgspec

from forge.errors import ConfigError
from forge.events import ErrorInfo, Event

if TYPE_CHECKING:
    from forge.runtime.context import Context

E = TypeVar("E", bound=Event)
ENTRY_POINT_GROUP = "forge.consumers"


@dataclass(frozen=True, slots=True)
class Message(Generic[E]):
    """A decoded event as a handler sees it."""

    event: E
    stream: str
    entry_id: str
    deliveries: int

    @property
    def is_redelivery(self) -> bool:
        """True when an earlier delivery may already have had (some) effects."""
        return self.deliveries > 1


class Succeeded(msgspec.Struct, frozen=True):
    """Done. ``publish`` lists ``(stream, event)`` pairs the runtime publishes in the
    transaction that acks the entry, and only if this delivery settles the event (not
    for a duplicate): side-effect events that must appear exactly once."""

    result: dict[str, Any] = msgspec.field(default_factory=dict)
    publish: tuple[tuple[str, Event], ...] = ()


class Failed(msgspec.Struct, frozen=True):
    """A valid request that cannot be done: acked with a ``failed`` completion."""

    error: ErrorInfo


class Rejected(msgspec.Struct, frozen=True):
    """An invalid event: dead-lettered at once, never retried."""

    error: ErrorInfo


Outcome = Succeeded | Failed | Rejected


class HandleFn(Protocol[E]):
    def __call__(self, messages: Sequence[Message[E]], /) -> Sequence[Outcome] | None: ...


@dataclass(frozen=True, slots=True)
class HandlerSpec(Generic[E]):
    """Binds an input stream (short name, e.g. ``new-data``) to its event type and handler.

    ``handle`` gets a batch and returns one outcome per message, in order (``None``
    means all succeeded with no result). Raising fails the whole batch: transient
    errors are retried, then the runtime retries message by message so one poison
    event cannot sink its neighbours. ``max_batch_size`` is the most entries one read
    hands it (default ``MAX_BATCH_SIZE``). ``concurrency`` above 1 runs that many of
    its batches at once, each in a thread of its own beside the worker loop
    (``forge.runtime.slots``): ``handle`` must then be safe to call from several threads.
    ``also``: other event types the stream carries, told apart by their ``type``
    tag; the handler gets those too.
    """

    stream: str
    event_type: type[E]
    handle: Callable[[Sequence[Message[E]]], Sequence[Outcome] | None]
    name: str = ""
    max_batch_size: int | None = None
    concurrency: int = 1
    also: tuple[type[Event], ...] = ()


@dataclass(slots=True)
class HandlerRegistry:
    """The handler of each input stream, by short stream name: at most one each."""

    handlers: dict[str, HandlerSpec[Any]] = field(default_factory=dict)

    def register(self, spec: HandlerSpec[Any]) -> None:
        if spec.stream in self.handlers:
            raise ConfigError(f"a handler for stream {spec.stream!r} is already registered")
        self.handlers[spec.stream] = spec

    def get(self, stream: str) -> HandlerSpec[Any]:
        try:
            return self.handlers[stream]
        except KeyError:
            raise ConfigError(f"no handler registered for stream {stream!r}") from None

    @property
    def streams(self) -> list[str]:
        return list(self.handlers)


RegisterFn = Callable[[HandlerRegistry, "Context"], None]


def load_register_fn(target: str) -> RegisterFn:
    """Resolve ``module:function`` to a consumer registration function."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--consumers expects 'module:function', got {target!r}")
    try:
        module = importlib.import_module(module_name)
        fn: RegisterFn = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load consumers {target!r}: {exc}") from None
    return fn


def discover_register_fns() -> list[RegisterFn]:
    """Registration functions installed under the ``forge.consumers`` entry point."""
    return [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]


def build_handler_registry(context: Context, targets: Sequence[str] = ()) -> HandlerRegistry:
    """Every handler the ``targets`` (``module:function``) register, or by default those
    of the functions installed under the ``forge.consumers`` entry point."""
    handlers = HandlerRegistry()
    fns = [load_register_fn(t) for t in targets] if targets else discover_register_fns()
    for fn in fns:
        fn(handlers, context)
    return handlers
