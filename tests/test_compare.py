"""The comparison's statistics on crafted counters, checked against textbook formulas
and, where it is installed, scipy."""

from __future__ import annotations

import math

import msgspec
import pytest

from forge.serving.compare import (
    BETTER,
    NO_DIFFERENCE,
    PROMOTION_Z,
    TEST,
    WORSE,
    Z_CRITICAL,
    Arm,
    VariantStats,
    compare,
    latency_quantile,
    promotes,
    two_proportion_z,
    two_sided_p,
    verdict,
    wilson_interval,
)
from forge.serving.records import LATENCY_BUCKETS_MS, latency_field


def stats(version: int, correct: int, feedback: int, predictions: int = 0) -> VariantStats:
    return VariantStats(version, predictions=predictions, feedback=feedback, correct=correct)


# ---------------------------------------------------------------------- known numbers


def test_the_z_statistic_of_a_textbook_example() -> None:
    # 80/100 against 90/100: pooled p = 0.85, se = sqrt(0.85 * 0.15 * (1/100 + 1/100)).
    z = two_proportion_z(stats(1, 80, 100), stats(2, 90, 100))
    assert z == pytest.approx(0.1 / math.sqrt(0.85 * 0.15 * 0.02))
    assert z == pytest.approx(1.9803, abs=1e-4)
    assert two_sided_p(z) == pytest.approx(0.04767, abs=1e-5)
    assert abs(Z_CRITICAL - 1.959964) < 1e-6


def test_the_wilson_interval_of_known_counts() -> None:
    # Wilson (1927) for 81 of 263: (0.2553, 0.3662), as in Newcombe (1998), table I.
    low, high = wilson_interval(81, 263) or (0.0, 0.0)
    assert (low, high) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) is None
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


@pytest.mark.parametrize(
    ("c1", "n1", "c2", "n2"),
    [(80, 100, 90, 100), (412, 500, 380, 500), (45, 90, 160, 250), (990, 1000, 996, 1000)],
)
def test_the_test_agrees_with_scipy(c1: int, n1: int, c2: int, n2: int) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    z = two_proportion_z(stats(1, c1, n1), stats(2, c2, n2))
    assert z is not None
    # The pooled z-test is the uncorrected chi-square test of the 2x2 table: chi2 = z^2.
    chi2, p_value, _, _ = scipy_stats.chi2_contingency(
        [[c1, n1 - c1], [c2, n2 - c2]], correction=False
    )
    assert z * z == pytest.approx(chi2, rel=1e-9)
    assert two_sided_p(z) == pytest.approx(p_value, rel=1e-9)
    assert two_sided_p(z) == pytest.approx(2 * scipy_stats.norm.sf(abs(z)), rel=1e-9)
    for k, n in ((c1, n1), (c2, n2)):
        expected = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_no_feedback_or_no_variance_gives_no_z() -> None:
    assert two_proportion_z(stats(1, 0, 0), stats(2, 5, 10)) is None
    assert two_proportion_z(stats(1, 50, 50), stats(2, 80, 80)) == 0.0


# ---------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("champion", "candidate", "expected"),
    [
        pytest.param((800, 1000), (850, 1000), BETTER, id="better"),
        pytest.param((850, 1000), (800, 1000), WORSE, id="worse"),
        pytest.param((800, 1000), (815, 1000), NO_DIFFERENCE, id="inside-the-bound"),
        pytest.param((10, 99), (99, 99), NO_DIFFERENCE, id="too-little-feedback"),
        pytest.param((80, 100), (90, 100), BETTER, id="just-significant"),
    ],
)
def test_verdicts_on_crafted_counters(
    champion: tuple[int, int], candidate: tuple[int, int], expected: str
) -> None:
    assert verdict(stats(1, *champion), stats(2, *candidate), min_feedback=100) == expected


def test_automatic_promotion_needs_the_stricter_bound() -> None:
    champion = stats(1, 80, 100)
    # z = 1.98: a "candidate better" verdict, but short of the promotion bound.
    assert verdict(champion, stats(2, 90, 100), 100) == BETTER
    assert not promotes(champion, stats(2, 90, 100), 100)
    strong = stats(2, 96, 100)
    z = two_proportion_z(champion, strong)
    assert z is not None
    assert z >= PROMOTION_Z
    assert promotes(champion, strong, 100)
    assert not promotes(champion, strong, 101)  # not before the minimum feedback
    assert not promotes(strong, champion, 100)  # one direction only


# ---------------------------------------------------------------------- latency


def _bucket(ms: float) -> int:
    return int(latency_field(ms / 1000).split(":")[1])


def test_latency_quantiles_interpolate_inside_buckets() -> None:
    assert latency_quantile({}, 0.5) is None
    # 100 requests in (2, 3] ms: the median is half-way through the bucket.
    assert latency_quantile({_bucket(2.5): 100}, 0.5) == pytest.approx(2.5)
    # 98 fast ones in (0.5, 1] ms, 2 in (75, 100] ms: p50 fast, p99 inside the slow bucket.
    buckets = {_bucket(0.7): 98, _bucket(80): 2}
    assert latency_quantile(buckets, 0.5) == pytest.approx(0.5 + 0.5 * 50 / 98)
    assert latency_quantile(buckets, 0.99) == pytest.approx(75 + 25 * 1 / 2)
    # The open top bucket answers its lower edge: "at least".
    assert latency_quantile({_bucket(9000): 5}, 0.99) == LATENCY_BUCKETS_MS[-1]


# ---------------------------------------------------------------------- the report


def test_the_comparison_reports_every_arm_and_states_its_test() -> None:
    champion = Arm(stats(3, 800, 1000, predictions=9000), ("champion",), traffic=0.9)
    challenger = Arm(stats(4, 850, 1000, predictions=1000), ("candidate",), traffic=0.1)
    shadow = Arm(stats(5, 0, 0, predictions=10000), ("7",), shadow=True)
    result = compare("m", champion, [challenger, shadow], min_feedback=100)
    assert result.test == TEST
    assert "two-sided two-proportion z-test" in result.test
    assert "z >= 3.0" in result.test
    first, second, third = result.variants
    assert (first.role, first.verdict, first.z) == ("champion", None, None)
    assert (second.role, second.verdict) == ("challenger", BETTER)
    assert second.z == pytest.approx(two_proportion_z(champion.stats, challenger.stats), abs=1e-4)
    assert second.accuracy == 0.85
    assert second.accuracy_ci95 == pytest.approx(wilson_interval(850, 1000), abs=1e-6)
    assert (third.shadow, third.verdict, third.accuracy, third.z) == (
        True,
        NO_DIFFERENCE,
        None,
        None,
    )
    decoded = msgspec.json.decode(msgspec.json.encode(result))
    assert decoded["variants"][1]["verdict"] == "candidate better"
    assert decoded["promotion_z"] == 3.0
