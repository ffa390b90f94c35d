"""Champion promotion: which version serves.

A new version becomes the ``champion`` when the request's policy says so: always,
never, or (the default) when it beats the current champion on the model's primary
metric, higher being better for every task. Otherwise it is the ``candidate``, which
``forge models promote`` can make champion later. A champion whose run lacks the
metric (it was trained for another task) cannot be compared, so it gives way.

With ``on-significance`` a new version is the candidate whatever its metrics, unless
the model has no champion at all (then nothing would serve): it becomes champion
when it wins the online comparison on live feedback (``forge.serving.autopromote``).
"""

from __future__ import annotations

import math
from typing import Literal

import structlog

from forge.training.versions import CANDIDATE, CHAMPION, ModelVersions, VersionInfo

log = structlog.get_logger(__name__)

Policy = Literal["if-better", "always", "never", "on-significance"]


def beats(policy: Policy, new_value: float | None, champion_value: float | None) -> bool:
    """Whether a new version with ``new_value`` replaces a champion with
    ``champion_value`` (``None``: there is no champion, or it has no such metric)."""
    if policy in ("never", "on-significance"):
        return False
    if policy == "always" or champion_value is None or math.isnan(champion_value):
        return True
    return new_value is not None and not math.isnan(new_value) and new_value > champion_value


def apply_policy(versions: ModelVersions, version: VersionInfo, policy: Policy) -> VersionInfo:
    """Give a new version its alias (``champion`` or ``candidate``); returns it updated."""
    aliases = versions.aliases(version.model)
    champion = aliases.get(CHAMPION)
    if champion == version.version:
        return version
    metric = version.primary_metric
    new_value = versions.metrics(version).get(metric)
    champion_value = None
    if champion is not None:
        champion_value = versions.metrics(versions.get(version.model, champion)).get(metric)
    if policy == "on-significance":
        # The online comparison decides; a model without a champion has nothing to serve.
        wins = champion is None
    else:
        wins = beats(policy, new_value, champion_value)
    if wins:
        promote(versions, version.model, version.version)
    else:
        versions.set_alias(version.model, CANDIDATE, version.version)
    log.info(
        "model version registered",
        model=version.model,
        version=version.version,
        metric=metric,
        value=new_value,
        champion=champion,
        champion_value=champion_value,
    )
    return versions.get(version.model, version.version)


def promote(versions: ModelVersions, model: str, version: int) -> VersionInfo:
    """Make ``version`` the champion. A candidate no newer than it is stale then (the
    candidate is the newest version that did not become champion) and loses its alias."""
    target = versions.get(model, version)
    versions.set_alias(model, CHAMPION, version)
    candidate = versions.aliases(model).get(CANDIDATE)
    if candidate is not None and candidate <= version:
        versions.drop_alias(model, CANDIDATE)
    return versions.get(model, target.version)
