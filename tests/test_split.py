"""Traffic splits: shares within a binomial tolerance, and sticky keys.

Each share is checked against 4 standard deviations of a binomial count
(sqrt(n p (1 - p))): a correct split fails such a check about once in 16,000 runs, and
the inputs are fixed (keys, seeds), so a run that passes passes every time.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from forge.serving.routing import Route, choose, parse_split

KEYS = [f"customer-{i}" for i in range(10_000)]


def assert_shares(counts: Counter[str], weights: dict[str, float], n: int) -> None:
    total = sum(weights.values())
    assert set(counts) <= set(weights)
    for ref, weight in weights.items():
        p = weight / total
        tolerance = 4 * math.sqrt(n * p * (1 - p))
        assert abs(counts[ref] - n * p) <= tolerance, (ref, counts[ref], n * p, tolerance)


@pytest.mark.parametrize(
    "split",
    [["champion=90", "candidate=10"], ["champion=50", "candidate=30", "7=20"], ["1=1", "2=1"]],
)
def test_keys_split_in_proportion(split: list[str]) -> None:
    route = Route(split=parse_split(split))
    rng = random.Random(0)
    counts = Counter(choose(route, "tickets", key, rng) for key in KEYS)
    assert_shares(counts, {v.ref: v.weight for v in route.split}, len(KEYS))


def test_requests_without_a_key_split_in_proportion_at_random() -> None:
    route = Route(split=parse_split(["champion=90", "candidate=10"]))
    rng = random.Random(42)
    counts = Counter(choose(route, "tickets", None, rng) for _ in range(10_000))
    assert_shares(counts, {"champion": 90, "candidate": 10}, 10_000)


def test_a_key_keeps_its_variant_while_the_split_stands() -> None:
    route = Route(split=parse_split(["champion=90", "candidate=10"]))
    first = {key: choose(route, "tickets", key, random.Random(1)) for key in KEYS}
    again = {key: choose(route, "tickets", key, random.Random(2)) for key in reversed(KEYS)}
    assert first == again
    # Ramping the candidate up moves keys to it, never away from it.
    ramped = Route(split=parse_split(["champion=80", "candidate=20"]))
    moved = {key: choose(ramped, "tickets", key, random.Random(3)) for key in KEYS}
    assert all(moved[k] == "candidate" for k, ref in first.items() if ref == "candidate")
    assert_shares(Counter(moved.values()), {"champion": 80, "candidate": 20}, len(KEYS))


def test_models_split_their_keys_independently() -> None:
    route = Route(split=parse_split(["champion=50", "candidate=50"]))
    rng = random.Random(0)
    a = [choose(route, "model-a", key, rng) == "candidate" for key in KEYS]
    b = [choose(route, "model-b", key, rng) == "candidate" for key in KEYS]
    both = sum(x and y for x, y in zip(a, b, strict=True))
    assert_shares(
        Counter({"both": both, "other": len(KEYS) - both}), {"both": 1, "other": 3}, len(KEYS)
    )


def test_no_split_sends_everything_to_the_champion() -> None:
    assert {choose(Route(), "m", key, random.Random(0)) for key in KEYS[:100]} == {"champion"}
