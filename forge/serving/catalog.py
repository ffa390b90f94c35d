"""The versions a server answers with: per model, its route, its aliases and every
version the route names, loaded. A model's state is replaced whole, and only once the
versions it names are loaded: a request sees one consistent view, and routing never
switches to a version that would make it wait on a cold load.

``refresh`` notices changes three ways: the routes epoch (bumped on every route or
alias change Forge makes), new entries of the ``model-versions`` stream (both one
Redis round trip, so callers refresh often), and a poll of each known model's aliases
in the registry every ``registry_poll_s`` (for changes made behind Forge's back: a
registry round trip per model, 10 ms or more of CPU on the embedded store, so rare).

With partitions ``model-versions`` is one stream per partition, each read on its own.
On a cluster one blocking XREAD cannot span their slots: ``wait_for_change`` then blocks
on the serving changes alone, for at most ``_CLUSTER_VERSION_WAIT_S``, so a new version
still arrives within about a second.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis
import structlog

from forge.events import EVENT_FIELD, ModelVersion
from forge.keys import Keys
from forge.serving.routing import CHAMPION_REF, Route, RouteStore
from forge.training.base import TrainedModel
from forge.training.service import TrainingService
from forge.training.versions import LATEST, ModelNotFound, VersionInfo

log = structlog.get_logger(__name__)

# Versions pinned by requests that the route does not name: their registry entries are
# remembered (per process); the models themselves live in the byte-bounded model cache
# only, so pinned versions never hold more memory than MODEL_CACHE_SIZE allows.
_PINNED_KEPT = 1024
# Unknown model names remembered (until the next registry poll is due, or a version of
# theirs is announced), so that requests naming models that do not exist cost no
# registry lookup each.
_UNKNOWN_KEPT = 1024
_VERSION_EVENTS_PER_READ = 1000
_CLUSTER_VERSION_WAIT_S = 1.0
# Registries number versions with 32-bit integers; a larger number names none (and
# would overflow the registry's query).
_MAX_VERSION = 2**31 - 1

# What XREAD answers for one stream: its name and its (entry id, fields) pairs.
_StreamEntries = tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]


@dataclass(frozen=True, slots=True)
class Loaded:
    info: VersionInfo
    model: TrainedModel

    @property
    def label(self) -> str:
        return f"model {self.info.model!r} version {self.info.version}"


@dataclass(frozen=True, slots=True)
class ModelState:
    """A model as served: ``default`` is the champion, else the latest version."""

    name: str
    route: Route
    aliases: dict[str, int]
    default: int
    latest: int
    loaded: dict[int, Loaded]

    def number(self, ref: str) -> int | None:
        """The version ``ref`` (a number, an alias, ``latest``) names, if any."""
        if ref.isascii() and ref.isdigit():
            return int(ref)
        if ref == CHAMPION_REF:
            return self.default
        if ref == LATEST:
            return self.latest
        return self.aliases.get(ref)

    def routed(self, ref: str) -> tuple[str, Loaded]:
        """The variant and version serving a request the split sent to ``ref``; a ref
        that resolves to nothing loaded (a dropped alias) falls back to the champion."""
        number = self.number(ref)
        found = self.loaded.get(number) if number is not None else None
        if found is None:
            return CHAMPION_REF, self.loaded[self.default]
        return ref, found

    def shadow(self) -> tuple[str, Loaded] | None:
        ref = self.route.shadow
        number = self.number(ref) if ref else None
        found = self.loaded.get(number) if number is not None else None
        return None if found is None or ref is None else (ref, found)


class Catalog:
    def __init__(
        self,
        training: TrainingService,
        routes: RouteStore,
        client: redis.Redis,
        keys: Keys,
        registry_poll_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.training = training
        self.routes = routes
        self.client = client
        self.keys = keys
        self.registry_poll_s = registry_poll_s
        self.clock = clock
        self._states: dict[str, ModelState] = {}
        self._pinned: OrderedDict[tuple[str, int], VersionInfo] = OrderedDict()
        self._unknown: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._epoch = routes.epoch()
        self._version_ids = {s: self._stream_end(s) for s in keys.physical(keys.model_versions)}
        self._last_change_id = self._stream_end(keys.serving_changes)
        self._next_poll_s = clock() + registry_poll_s

    def known(self) -> list[str]:
        return list(self._states)

    def get(self, model: str) -> ModelState | None:
        return self._states.get(model)

    def state(self, model: str) -> ModelState:
        """The model's state, built now (a cold load) the first time it is asked for;
        ``ModelNotFound`` for a model that does not exist or has no versions."""
        found = self._states.get(model)
        if found is not None:
            return found
        self._raise_if_known_unknown(model)
        try:
            state = self._build(model, None)
        except ModelNotFound as exc:
            self._remember_unknown(model, str(exc))
            raise
        with self._lock:
            return self._states.setdefault(model, state)

    def pinned(self, state: ModelState, ref: str) -> Loaded:
        """The version a request pinned: one the route serves, else one from the model
        cache (loaded now, the first time or after the cache evicted it)."""
        number = state.number(ref)
        if number is None or number > _MAX_VERSION:
            raise ModelNotFound(f"model {state.name!r} has no version {ref!r}")
        found = state.loaded.get(number)
        if found is not None:
            return found
        key = (state.name, number)
        with self._lock:
            info = self._pinned.get(key)
            if info is not None:
                self._pinned.move_to_end(key)
        if info is None:
            loaded = self._load(state.name, number)
            with self._lock:
                self._pinned[key] = loaded.info
                while len(self._pinned) > _PINNED_KEPT:
                    self._pinned.popitem(last=False)
            return loaded
        return Loaded(info, self.training.load_version(info))

    # ------------------------------------------------------------------ changes

    def wait_for_change(self, timeout_s: float) -> None:
        """Return once a change is announced (a new version, an epoch bump), or after
        ``timeout_s``: one blocking XREAD, so a server's next ``refresh`` can follow a
        change at once instead of at its next poll. Reads nothing ``refresh`` needs."""
        if self.keys.cluster:
            timeout_s = min(timeout_s, _CLUSTER_VERSION_WAIT_S)
        block_ms = int(timeout_s * 1000)
        if block_ms < 1:  # BLOCK 0 would wait for ever
            return
        streams: dict[Any, Any] = {self.keys.serving_changes: self._last_change_id}
        if not self.keys.cluster:
            streams |= self._version_ids
        reply: Any = self.client.xread(streams, count=1, block=block_ms)
        for stream, items in reply or ():
            if stream.decode() == self.keys.serving_changes and items:
                self._last_change_id = items[-1][0].decode()

    def refresh(self) -> None:
        """Rebuild the states of models that may have changed (see the module notes)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.routes_epoch)
        for stream, last_id in self._version_ids.items():  # one XREAD a slot
            pipe.xread({stream: last_id}, _VERSION_EVENTS_PER_READ)
        raw_epoch, *replies = pipe.execute()
        epoch = int(raw_epoch) if raw_epoch is not None else 0
        announced = self._announced(e for reply in replies for e in reply or ())
        with self._lock:
            for model in announced:
                self._unknown.pop(model, None)
        now = self.clock()
        check_all = epoch != self._epoch or now >= self._next_poll_s
        self._epoch = epoch
        if now >= self._next_poll_s:
            self._next_poll_s = now + self.registry_poll_s
        names = self.known() if check_all else [m for m in announced if m in self._states]
        for model in names:
            self._rebuild(model, force=model in announced)

    def _rebuild(self, model: str, *, force: bool) -> None:
        old = self._states.get(model)
        try:
            state = self._build(model, old, force=force)
        except ModelNotFound as exc:
            log.warning("model no longer served", model=model, reason=str(exc))
            with self._lock:
                self._states.pop(model, None)
            return
        except Exception as exc:  # the registry or Redis is down: keep serving as is
            log.warning("model not refreshed", model=model, error=f"{type(exc).__name__}: {exc}")
            return
        if state is not old:
            with self._lock:
                self._states[model] = state
            if old is None or _serving(old) != _serving(state):
                log.info("serving changed", model=model, **_serving(state))

    def _build(self, model: str, old: ModelState | None, *, force: bool = False) -> ModelState:
        """The model's state now: ``old`` itself when neither aliases nor route moved
        (unless ``force``: a version was registered), reusing what ``old`` has loaded."""
        versions = self.training.versions
        aliases = versions.aliases(model)
        route = self._route(model)
        if not force and old is not None and old.aliases == aliases and old.route == route:
            return old
        latest = versions.latest(model)
        if latest is None:
            raise ModelNotFound(f"model {model!r} has no versions")
        default = aliases.get(CHAMPION_REF, latest.version)
        draft = ModelState(model, route, aliases, default, latest.version, {})
        wanted = {default} | {n for n in map(draft.number, route.refs) if n is not None}
        carried = old.loaded if old is not None else {}
        loaded = {default: carried.get(default) or self._load(model, default)}
        for number in sorted(wanted - {default}):
            found = carried.get(number) or self._try_load(model, number)
            if found is not None:
                loaded[number] = found
        return ModelState(model, route, aliases, default, latest.version, loaded)

    def _route(self, model: str) -> Route:
        try:
            return self.routes.get(model)
        except msgspec.DecodeError as exc:  # written by hand? serve the champion meanwhile
            log.warning("unreadable route: serving the champion", model=model, error=str(exc))
            return Route()

    def _load(self, model: str, number: int) -> Loaded:
        trained, info = self.training.load(model, str(number))
        return Loaded(info, trained)

    def _try_load(self, model: str, number: int) -> Loaded | None:
        """A version the route names; one that cannot be loaded is routed around."""
        try:
            return self._load(model, number)
        except Exception as exc:
            log.warning(
                "version not loaded: its traffic goes to the champion",
                model=model,
                version=number,
                error=f"{type(exc).__name__}: {exc}",
            )
            return None

    # ------------------------------------------------------------------ helpers

    def _stream_end(self, stream: str) -> str:
        last: Any = self.client.xrevrange(stream, count=1)
        return str(last[0][0].decode()) if last else "0-0"

    def _announced(self, entries: Iterable[_StreamEntries]) -> set[str]:
        """Models named by new ``model-version`` events (unreadable ones are skipped)."""
        models: set[str] = set()
        for stream, items in entries:
            for entry_id, fields in items:
                self._version_ids[stream.decode()] = entry_id.decode()
                try:
                    models.add(_version_decoder.decode(fields[EVENT_FIELD]).model)
                except (KeyError, msgspec.DecodeError):
                    continue
        return models

    def _raise_if_known_unknown(self, model: str) -> None:
        with self._lock:
            found = self._unknown.get(model)
        if found is not None and self.clock() < found[0]:
            raise ModelNotFound(found[1])

    def _remember_unknown(self, model: str, message: str) -> None:
        with self._lock:
            self._unknown[model] = (self.clock() + self.registry_poll_s, message)
            self._unknown.move_to_end(model)
            while len(self._unknown) > _UNKNOWN_KEPT:
                self._unknown.popitem(last=False)


_version_decoder = msgspec.json.Decoder(ModelVersion)


def _serving(state: ModelState) -> dict[str, object]:
    split = {v.ref: state.routed(v.ref)[1].info.version for v in state.route.split}
    shadow = state.shadow()
    return {
        "champion": state.default,
        "split": split,
        "shadow": shadow[1].info.version if shadow else None,
    }
