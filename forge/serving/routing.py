"""Which version answers a prediction: a model's route (its traffic split, shadow and
promotion policy), stored in Redis so that every server and worker applies a change
within ``serve_reload_interval_s``, and the sticky assignment of keys to variants.

A variant is named by a reference: an alias (``champion``, ``candidate``) or a version
number. A model without a split sends everything to its champion.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec
import redis
from msgspec import Meta
from redis.client import Pipeline

from forge.errors import ConfigError
from forge.keys import Keys

CHAMPION_REF = "champion"
_REF = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_HASH_SPACE = float(2**64)

PromotionPolicy = Literal["manual", "on-significance"]


class Variant(msgspec.Struct, frozen=True, kw_only=True):
    ref: str
    weight: Annotated[float, Meta(gt=0)]


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """A model's serving route. An empty split means: all traffic to the champion."""

    split: list[Variant] = msgspec.field(default_factory=list)
    shadow: str | None = None
    policy: PromotionPolicy = "manual"

    @property
    def refs(self) -> list[str]:
        """Every reference the route names: the split's, then the shadow."""
        refs = [v.ref for v in self.split] or [CHAMPION_REF]
        return refs + ([self.shadow] if self.shadow and self.shadow not in refs else [])


def parse_split(items: Sequence[str]) -> list[Variant]:
    """``["champion=90", "candidate=10"]`` as variants; ``ConfigError`` names a bad one."""
    variants: list[Variant] = []
    for item in items:
        ref, sep, weight = item.partition("=")
        if not sep or not _REF.fullmatch(ref):
            raise ConfigError(f"not a variant: {item!r} (expected REF=WEIGHT, e.g. champion=90)")
        try:
            share = float(weight)
        except ValueError:
            raise ConfigError(f"not a weight: {weight!r} in {item!r}") from None
        if not share > 0 or share == float("inf"):
            raise ConfigError(f"a weight must be a positive number, got {weight!r} in {item!r}")
        variants.append(Variant(ref=ref, weight=share))
    refs = [v.ref for v in variants]
    if len(set(refs)) != len(refs):
        raise ConfigError(f"a variant is named twice in {' '.join(items)}")
    if len(variants) < 2:
        raise ConfigError("a split needs at least two variants, e.g. champion=90 candidate=10")
    return variants


def check_ref(ref: str) -> str:
    if not _REF.fullmatch(ref):
        raise ConfigError(f"not an alias or version number: {ref!r}")
    return ref


def key_position(model: str, key: str) -> float:
    """Where ``key`` falls in [0, 1): a stable hash, the same in every process and
    Python version (unlike ``hash``), and independent between models."""
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE


def choose(route: Route, model: str, key: str | None, rng: random.Random) -> str:
    """The reference that serves a request: by ``key``'s hash when there is one (so a
    key keeps its variant while the split stands), else at random by the weights."""
    if not route.split:
        return CHAMPION_REF
    position = key_position(model, key) if key is not None else rng.random()
    total = sum(v.weight for v in route.split)
    edge = 0.0
    for variant in route.split:
        edge += variant.weight / total
        if position < edge:
            return variant.ref
    return route.split[-1].ref  # rounding at the top edge


_decoder = msgspec.json.Decoder(Route)
# Entries of the changes stream kept: only a wake-up, the epoch says what changed.
_CHANGES_KEPT = 100


class RouteStore:
    """Routes in Redis, and the epoch counter servers poll to notice any change."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def get(self, model: str) -> Route:
        raw = self.client.get(self.keys.route(model))
        return Route() if raw is None else _decoder.decode(raw)

    def put(self, model: str, route: Route) -> None:
        """Store ``route`` (an empty one is deleted) and bump the epoch, atomically."""
        pipe = self.client.pipeline(transaction=True)
        if route == Route():
            pipe.delete(self.keys.route(model))
        else:
            pipe.set(self.keys.route(model), msgspec.json.encode(route))
        self._bump(pipe)
        pipe.execute()

    def bump(self) -> int:
        """Tell servers that something they route by changed (an alias moved)."""
        pipe = self.client.pipeline(transaction=True)
        self._bump(pipe)
        epoch, _ = pipe.execute()
        return int(epoch)

    def _bump(self, pipe: Pipeline) -> None:
        """The epoch, and an entry that wakes servers blocked on the changes stream."""
        pipe.incr(self.keys.routes_epoch)
        pipe.xadd(self.keys.serving_changes, {"change": "routes"}, maxlen=_CHANGES_KEPT)

    def epoch(self) -> int:
        raw = self.client.get(self.keys.routes_epoch)
        return int(raw) if raw is not None else 0
