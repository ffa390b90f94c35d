"""A model's experiment as it stands: its route resolved to versions through the
registry's aliases, each version's online counters from Redis, and the comparison
(``forge models compare``, automatic promotion) made of them.

Aliases are passed in (``ModelVersions.aliases``), so nothing here talks to MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from forge.errors import ConfigError
from forge.keys import Keys
from forge.serving.compare import Arm, Comparison, VariantStats, compare
from forge.serving.routing import CHAMPION_REF, Route, RouteStore

CANDIDATE_REF = "candidate"


def resolve_ref(ref: str, aliases: Mapping[str, int]) -> int | None:
    """The version ``ref`` (an alias or a number) names; ``None`` if none. A number
    is not checked against the registry here (callers that must, do)."""
    if ref.isdigit():
        return int(ref)
    return aliases.get(ref)


@dataclass(frozen=True, slots=True)
class ResolvedRoute:
    """A route as versions: traffic share and refs per version, the shadow's version."""

    champion: int
    traffic: dict[int, float]
    refs: dict[int, list[str]]
    shadow: int | None
    unresolved: list[str]

    @property
    def versions(self) -> list[int]:
        """The champion first, then the others in the route's order."""
        others = [v for v in self.refs if v != self.champion]
        return [self.champion, *others]


def resolve_route(route: Route, aliases: Mapping[str, int]) -> ResolvedRoute:
    """``route`` in versions. ``ConfigError`` when the model has no champion."""
    champion = aliases.get(CHAMPION_REF)
    if champion is None:
        raise ConfigError("the model has no champion: nothing to compare against")
    refs: dict[int, list[str]] = {champion: []}
    traffic: dict[int, float] = {}
    unresolved: list[str] = []
    total = sum(v.weight for v in route.split)
    for variant in route.split:
        version = resolve_ref(variant.ref, aliases)
        if version is None:
            unresolved.append(variant.ref)
            continue
        refs.setdefault(version, []).append(variant.ref)
        traffic[version] = traffic.get(version, 0.0) + variant.weight / total
    if not route.split:
        refs[champion].append(CHAMPION_REF)
        traffic[champion] = 1.0
    shadow = None
    if route.shadow is not None:
        shadow = resolve_ref(route.shadow, aliases)
        if shadow is None:
            unresolved.append(route.shadow)
        else:
            refs.setdefault(shadow, []).append(route.shadow)
    if CHAMPION_REF not in refs[champion]:
        refs[champion].insert(0, CHAMPION_REF)
    return ResolvedRoute(champion, traffic, refs, shadow, unresolved)


def read_stats(
    client: redis.Redis, keys: Keys, model: str, versions: Sequence[int]
) -> dict[int, VariantStats]:
    """Each version's counters, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for version in versions:
        pipe.hgetall(keys.variant_stats(model, version))
    raws = pipe.execute()
    return {v: VariantStats.from_hash(v, raw) for v, raw in zip(versions, raws, strict=True)}


def comparison(
    client: redis.Redis,
    keys: Keys,
    model: str,
    route: Route,
    aliases: Mapping[str, int],
    min_feedback: int,
) -> Comparison:
    """The comparison of every version ``route`` names (the champion always)."""
    resolved = resolve_route(route, aliases)
    stats = read_stats(client, keys, model, resolved.versions)

    def arm(version: int) -> Arm:
        return Arm(
            stats=stats[version],
            refs=tuple(resolved.refs[version]),
            traffic=resolved.traffic.get(version, 0.0),
            shadow=version == resolved.shadow and version not in resolved.traffic,
        )

    return compare(
        model,
        arm(resolved.champion),
        [arm(v) for v in resolved.versions[1:]],
        min_feedback=min_feedback,
        policy=route.policy,
        unresolved=resolved.unresolved,
    )


def enroll(routes: RouteStore, model: str, *, shadow_candidate: bool) -> Route:
    """Put ``model`` under ``promote: on-significance``: its route's policy says so
    and, when the route has neither split nor shadow and ``shadow_candidate``, the
    candidate shadows the champion, so it is evaluated on live traffic without any
    caller seeing its answers. An existing split or shadow is kept as it is."""
    route = routes.get(model)
    shadow = route.shadow
    if shadow_candidate and not route.split and shadow is None:
        shadow = CANDIDATE_REF
    updated = Route(split=route.split, shadow=shadow, policy="on-significance")
    routes.put(model, updated)  # bumps the epoch: the alias moved as well
    return updated
