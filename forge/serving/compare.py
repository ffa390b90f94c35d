"""Online comparison of a model's variants: accuracy on joined feedback, latency, and a
verdict for each challenger against the champion. Pure functions over counters.

The test (``TEST``): a two-sided two-proportion z-test (pooled standard error) of the
challenger's online accuracy against the champion's, at alpha = 0.05 (|z| >= 1.96),
given only once both have at least ``compare_min_feedback`` feedback; before that, and
inside the bound, the verdict is "no difference yet". Accuracies carry a 95% Wilson
score interval.

A shadow answers the same rows as the champion, so the two samples are paired, not
independent as the z-test assumes. Both models tend to be right on the same easy rows
(positive correlation), which makes the true variance of the difference smaller than
the test's: the test is conservative for a shadow, never anti-conservative.

Automatic promotion (``promote: on-significance``) looks again after every feedback
batch, and repeated looks at a fixed alpha inflate false positives: a 1.96 bound,
checked every 32 feedback from 100 to 20,000, is crossed by about 25% of candidates
that are no better (simulated). It therefore needs ``z >= PROMOTION_Z`` (3.0, one
direction only: the candidate better), a constant bound in the manner of Pocock's: in
the same simulation, from 100 to 100,000 feedback, about 3% of equal candidates are
promoted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

import msgspec

from forge.serving.records import CORRECT, FEEDBACK, LATENCY_BUCKETS_MS, PREDICTIONS

ALPHA = 0.05
Z_CRITICAL = NormalDist().inv_cdf(1 - ALPHA / 2)  # 1.959964...
PROMOTION_Z = 3.0
TEST = (
    "two-sided two-proportion z-test (pooled), alpha=0.05 (|z| >= 1.96), once both have"
    " the minimum feedback; automatic promotion needs z >= 3.0"
)
Verdict = Literal["candidate better", "no difference yet", "candidate worse"]
BETTER: Verdict = "candidate better"
NO_DIFFERENCE: Verdict = "no difference yet"
WORSE: Verdict = "candidate worse"
_LATENCY_PREFIX = "latency:"


@dataclass(frozen=True, slots=True)
class VariantStats:
    """One version's online counters (``Keys.variant_stats``)."""

    version: int
    predictions: int = 0
    feedback: int = 0
    correct: int = 0
    # Latency bucket index (see ``records.latency_field``) -> requests.
    latency: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, version: int, raw: Mapping[bytes, bytes]) -> VariantStats:
        values = {k.decode(): int(v) for k, v in raw.items()}
        latency = {
            int(name.removeprefix(_LATENCY_PREFIX)): count
            for name, count in values.items()
            if name.startswith(_LATENCY_PREFIX)
        }
        return cls(
            version=version,
            predictions=values.get(PREDICTIONS, 0),
            feedback=values.get(FEEDBACK, 0),
            correct=values.get(CORRECT, 0),
            latency=latency,
        )

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.feedback if self.feedback else None


class VariantReport(msgspec.Struct, kw_only=True):
    """A variant's line of ``forge models compare``; challengers carry a verdict."""

    version: int
    refs: list[str]
    role: Literal["champion", "challenger"]
    traffic: float
    shadow: bool
    predictions: int
    feedback: int
    correct: int
    accuracy: float | None
    accuracy_ci95: tuple[float, float] | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    z: float | None = None
    p_value: float | None = None
    verdict: Verdict | None = None


class Comparison(msgspec.Struct, kw_only=True):
    model: str
    policy: str
    test: str
    alpha: float
    min_feedback: int
    promotion_z: float
    variants: list[VariantReport]
    # Route references that name no version of the model (yet).
    unresolved: list[str] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Arm:
    """A version the route sends traffic to (or shadows), with the refs naming it."""

    stats: VariantStats
    refs: tuple[str, ...]
    traffic: float = 0.0
    shadow: bool = False


# ---------------------------------------------------------------------- statistics


def wilson_interval(correct: int, n: int, z: float = Z_CRITICAL) -> tuple[float, float] | None:
    """The Wilson score interval of ``correct / n``; ``None`` without observations."""
    if n <= 0:
        return None
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_z(champion: VariantStats, candidate: VariantStats) -> float | None:
    """z of the candidate's accuracy minus the champion's, pooled standard error;
    ``None`` without feedback on either side. Equal all-right (or all-wrong) samples
    show no difference: 0."""
    n1, n2 = champion.feedback, candidate.feedback
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (champion.correct + candidate.correct) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0
    return (candidate.correct / n2 - champion.correct / n1) / se


def two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def verdict(champion: VariantStats, candidate: VariantStats, min_feedback: int) -> Verdict:
    """The stated test (module notes) of ``candidate`` against ``champion``."""
    z = two_proportion_z(champion, candidate)
    if z is None or min(champion.feedback, candidate.feedback) < min_feedback:
        return NO_DIFFERENCE
    if z >= Z_CRITICAL:
        return BETTER
    if z <= -Z_CRITICAL:
        return WORSE
    return NO_DIFFERENCE


def promotes(champion: VariantStats, candidate: VariantStats, min_feedback: int) -> bool:
    """Whether automatic promotion replaces ``champion`` with ``candidate``: both have
    ``min_feedback`` and z >= ``PROMOTION_Z`` (the stricter bound, see the module notes)."""
    if min(champion.feedback, candidate.feedback) < min_feedback:
        return False
    z = two_proportion_z(champion, candidate)
    return z is not None and z >= PROMOTION_Z


def latency_quantile(buckets: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile in milliseconds, interpolated linearly inside its bucket as
    Prometheus' ``histogram_quantile`` does; in the open top bucket, its lower edge
    (the answer is "at least that"). ``None`` without requests."""
    total = sum(buckets.values())
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(buckets):
        count = buckets[index]
        if count <= 0:
            continue
        lower = LATENCY_BUCKETS_MS[index - 1] if index > 0 else 0.0
        if index >= len(LATENCY_BUCKETS_MS):
            return LATENCY_BUCKETS_MS[-1]
        if seen + count >= rank:
            upper = LATENCY_BUCKETS_MS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS_MS[-1]  # unreachable: the last bucket holds the top rank


# ---------------------------------------------------------------------- comparison


def compare(
    model: str,
    champion: Arm,
    challengers: Sequence[Arm],
    *,
    min_feedback: int,
    policy: str = "manual",
    unresolved: Sequence[str] = (),
) -> Comparison:
    """Every arm's report; each challenger with its z, p-value and verdict."""
    reports = [_report(champion, "champion")]
    for arm in challengers:
        report = _report(arm, "challenger")
        z = two_proportion_z(champion.stats, arm.stats)
        report.z = None if z is None else round(z, 4)
        report.p_value = None if z is None else round(two_sided_p(z), 6)
        report.verdict = verdict(champion.stats, arm.stats, min_feedback)
        reports.append(report)
    return Comparison(
        model=model,
        policy=policy,
        test=TEST,
        alpha=ALPHA,
        min_feedback=min_feedback,
        promotion_z=PROMOTION_Z,
        variants=reports,
        unresolved=list(unresolved),
    )


def _report(arm: Arm, role: Literal["champion", "challenger"]) -> VariantReport:
    stats = arm.stats
    interval = wilson_interval(stats.correct, stats.feedback)
    return VariantReport(
        version=stats.version,
        refs=list(arm.refs),
        role=role,
        traffic=round(arm.traffic, 6),
        shadow=arm.shadow,
        predictions=stats.predictions,
        feedback=stats.feedback,
        correct=stats.correct,
        accuracy=_rounded(stats.accuracy),
        accuracy_ci95=None if interval is None else (round(interval[0], 6), round(interval[1], 6)),
        latency_p50_ms=_rounded(latency_quantile(stats.latency, 0.5)),
        latency_p99_ms=_rounded(latency_quantile(stats.latency, 0.99)),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
