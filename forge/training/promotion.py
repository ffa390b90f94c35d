"""Champion promotion: which version serves.

A new version becomes the ``champion`` when the request's policy says so: always,
never, or (the default) when it beats the current champion on the model's primary
metric, higher being better for every task. Otherwise it is the ``candidate``, which
``forge models promote`` can make champion later. A champion whose run lacks the
metric (it was trained for another task) cannot be compared, so it gives way.
"""

from __future__ import annotations

import math
from typing import Literal

import structlog

from forge.training.versions import CANDIDATE, CHAMPION, ModelRegistry, VersionInfo

log = structlog.get_logger(__name__)

Policy = Literal["if-better", "always", "never"]


def beats(policy: Policy, new_value: float | None, champion_value: float | None) -> bool:
    """Whether a new version with ``new_value`` replaces a champion with
    ``champion_value`` (``None``: there is no champion, or it has no such metric)."""
    if policy == "never":
        return False
    if policy == "always" or champion_value is None or math.isnan(champion_value):
        return True
    return new_value is not None and not math.isnan(new_value) and new_value > champion_value


def apply_policy(registry: ModelRegistry, version: VersionInfo, policy: Policy) -> VersionInfo:
    """Give a new version its alias (``champion`` or ``candidate``); returns it updated."""
    aliases = registry.aliases(version.model)
    champion = aliases.get(CHAMPION)
    if champion == version.version:
        return version
    metric = version.primary_metric
    new_value = registry.metrics(version).get(metric)
    champion_value = None
    if champion is not None:
        champion_value = registry.metrics(registry.get(version.model, champion)).get(metric)
    if beats(policy, new_value, champion_value):
        promote(registry, version.model, version.version)
    else:
        registry.set_alias(version.model, CANDIDATE, version.version)
    log.info(
        "model version registered",
        model=version.model,
        version=version.version,
        metric=metric,
        value=new_value,
        champion=champion,
        champion_value=champion_value,
    )
    return registry.get(version.model, version.version)


def promote(registry: ModelRegistry, model: str, version: int) -> VersionInfo:
    """Make ``version`` the champion. A candidate no newer than it is stale then (the
    candidate is the newest version that did not become champion) and loses its alias."""
    target = registry.get(model, version)
    registry.set_alias(model, CHAMPION, version)
    candidate = registry.aliases(model).get(CANDIDATE)
    if candidate is not None and candidate <= version:
        registry.drop_alias(model, CANDIDATE)
    return registry.get(model, target.version)
