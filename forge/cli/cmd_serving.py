"""``forge models split``, ``shadow`` and ``compare``: champion/challenger experiments.

Routes live in Redis (``RouteStore``, which bumps the epoch servers poll, so a change
reaches them within ``FORGE_SERVE_RELOAD_INTERVAL_S``); the references they name are
checked against the MLflow model registry before one is stored.

Redis, MLflow and the serving modules are imported when a command runs: building the
parser, or importing this module, must stay cheap (tests/test_cli_imports.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from forge.cli.cmd_models import mlflow_errors
from forge.cli.output import print_json, print_table
from forge.errors import ConfigError, UsageError
from forge.settings import Settings

if TYPE_CHECKING:
    from forge.serving.compare import Comparison
    from forge.serving.routing import Route, RouteStore, Variant
    from forge.training.versions import ModelVersions


def run_split(args: argparse.Namespace, settings: Settings) -> int:
    from forge.serving.experiment import resolve_ref
    from forge.serving.routing import Route, parse_split

    if args.clear == bool(args.variants):
        raise UsageError("give the split as REF=WEIGHT (e.g. champion=90 candidate=10), or --clear")
    variants = [] if args.clear else parse_split(args.variants)
    with _experiment(settings) as (routes, versions):
        aliases = versions.aliases(args.model)  # "no model named ..." for an unknown one
        found = {v.ref: _resolve(versions, args.model, aliases, v.ref) for v in variants}
        _distinct(found)
        route = routes.get(args.model)
        shadow = resolve_ref(route.shadow, aliases) if route.shadow else None
        if shadow is not None and shadow in found.values():
            raise ConfigError(f"{route.shadow} (version {shadow}) is the shadow: stop it first")
        updated = Route(split=variants, shadow=route.shadow, policy=route.policy)
        routes.put(args.model, updated)
    _print_split(args.model, updated.split, found, aliases)
    return 0


def run_shadow(args: argparse.Namespace, settings: Settings) -> int:
    from forge.serving.routing import Route, check_ref

    if args.off == (args.ref is not None):
        raise UsageError("name the version to shadow (e.g. candidate), or --off")
    ref = None if args.off else check_ref(args.ref)
    with _experiment(settings) as (routes, versions):
        aliases = versions.aliases(args.model)
        route = routes.get(args.model)
        if ref is None:
            routes.put(args.model, Route(split=route.split, policy=route.policy))
            print(f"{args.model}: no shadow")
            return 0
        version = _resolve(versions, args.model, aliases, ref)
        if version in _serving(route, aliases):
            raise ConfigError(f"{ref} is version {version}, which already serves traffic")
        routes.put(args.model, Route(split=route.split, shadow=ref, policy=route.policy))
    print(f"{args.model}: {ref} (version {version}) shadows the traffic, its answers unseen")
    return 0


def run_compare(args: argparse.Namespace, settings: Settings) -> int:
    from forge.serving.experiment import comparison

    with _experiment(settings) as (routes, versions):
        aliases = versions.aliases(args.model)
        route = routes.get(args.model)
        result = comparison(
            routes.client,
            routes.keys,
            args.model,
            route,
            aliases,
            settings.compare_min_feedback,
        )
    if args.json:
        print_json(result)
        return 0
    _print_comparison(result)
    return 0


# ---------------------------------------------------------------------- helpers


@contextmanager
def _experiment(settings: Settings) -> Iterator[tuple[RouteStore, ModelVersions]]:
    from forge.keys import Keys
    from forge.servers.endpoints import open_redis
    from forge.serving.routing import RouteStore
    from forge.training.tracking import connect
    from forge.training.versions import ModelVersions

    with mlflow_errors(), open_redis(settings) as (client, used):
        yield RouteStore(client, Keys.from_settings(used)), ModelVersions(connect(settings))


def _resolve(versions: ModelVersions, model: str, aliases: Mapping[str, int], ref: str) -> int:
    """The version ``ref`` names, checked against the registry."""
    if ref.isdigit():
        return versions.get(model, int(ref)).version  # says "has no version N"
    version = aliases.get(ref)
    if version is None:
        raise ConfigError(f"model {model!r} has no version {ref!r}")
    return version


def _serving(route: Route, aliases: Mapping[str, int]) -> set[int]:
    """The versions the route sends traffic to (a stale reference names none)."""
    from forge.serving.experiment import resolve_ref
    from forge.serving.routing import CHAMPION_REF

    refs = [v.ref for v in route.split] or [CHAMPION_REF]
    return {v for v in (resolve_ref(ref, aliases) for ref in refs) if v is not None}


def _distinct(found: Mapping[str, int]) -> None:
    seen: dict[int, str] = {}
    for ref, version in found.items():
        if version in seen:
            raise ConfigError(f"{seen[version]} and {ref} are both version {version}")
        seen[version] = ref


def _print_split(
    model: str, split: Sequence[Variant], found: Mapping[str, int], aliases: Mapping[str, int]
) -> None:
    if not split:
        print(f"{model}: no split, all traffic to the champion (version {aliases.get('champion')})")
        return
    total = sum(v.weight for v in split)
    print(f"{model}: traffic split")
    rows = [[v.ref, found[v.ref], f"{v.weight:g}", f"{100 * v.weight / total:.1f}%"] for v in split]
    print_table(["ref", "version", "weight", "share"], rows)


def _print_comparison(result: Comparison) -> None:
    rows = []
    for v in result.variants:
        interval = v.accuracy_ci95
        rows.append(
            [
                v.version,
                ",".join(v.refs),
                "shadow" if v.shadow else f"{100 * v.traffic:.1f}%",
                v.predictions,
                v.feedback,
                _fixed(v.accuracy),
                f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else None,
                _fixed(v.latency_p50_ms, 2),
                _fixed(v.latency_p99_ms, 2),
                _fixed(v.z, 2),
                v.verdict or "",
            ]
        )
    headers = ["version", "refs", "traffic", "predictions", "feedback", "accuracy", "95% ci"]
    print(f"{result.model} (policy {result.policy}, min feedback {result.min_feedback})")
    print_table([*headers, "p50 ms", "p99 ms", "z", "verdict"], rows)
    print(f"test: {result.test}")
    if result.unresolved:
        print(f"not a version (yet): {', '.join(result.unresolved)}")


def _fixed(value: float | None, digits: int = 3) -> str | None:
    return None if value is None else f"{value:.{digits}f}"
