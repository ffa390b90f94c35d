"""``forge models split``, ``shadow``, ``compare`` and the epoch ``promote`` bumps:
real Redis, a real MLflow registry with versions from empty runs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forge.runtime.context import Context
from forge.serving.compare import TEST
from forge.serving.routing import Route, RouteStore, Variant
from forge.training.tracking import connect
from forge.training.versions import CANDIDATE, CHAMPION, ModelVersions
from tests.registry_fixtures import register_versions
from tests.support.cli import assert_one_line_error, run_cli


@pytest.fixture
def model(
    cli_env: Context, registry_uri: str, registry_model: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A model with versions 1 (champion), 2 (candidate) and 3."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_uri)
    versions = ModelVersions(connect(cli_env.settings.replace(mlflow_tracking_uri=registry_uri)))
    register_versions(versions, registry_model, 3, {CHAMPION: 1, CANDIDATE: 2})
    return registry_model


@pytest.fixture
def routes(cli_env: Context) -> RouteStore:
    return RouteStore(cli_env.redis, cli_env.keys)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "models", *argv)


def test_split_stores_the_route_and_clear_removes_it(
    capsys: pytest.CaptureFixture[str], model: str, routes: RouteStore
) -> None:
    epoch = routes.epoch()
    code, out, err = cli(capsys, "split", model, "champion=90", "candidate=10")
    assert (code, err) == (0, "")
    assert routes.get(model) == Route(
        split=[Variant(ref="champion", weight=90), Variant(ref="candidate", weight=10)]
    )
    assert routes.epoch() > epoch
    lines = out.splitlines()
    assert lines[0] == f"{model}: traffic split"
    assert lines[2].split() == ["champion", "1", "90", "90.0%"]
    assert lines[3].split() == ["candidate", "2", "10", "10.0%"]

    code, out, _ = cli(capsys, "split", model, "1=1", "3=3")
    assert code == 0
    assert [v.ref for v in routes.get(model).split] == ["1", "3"]
    assert out.splitlines()[3].split() == ["3", "3", "3", "75.0%"]

    code, out, _ = cli(capsys, "split", model, "--clear")
    assert (code, out) == (0, f"{model}: no split, all traffic to the champion (version 1)\n")
    assert routes.get(model) == Route()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["champion=90"], "a split needs at least two variants"),
        (["champion=90", "candidate=x"], "not a weight: 'x'"),
        (["champion=90", "candidate=-1"], "a weight must be a positive number"),
        (["champion", "candidate=10"], "not a variant: 'champion'"),
        (["champion=50", "champion=50"], "a variant is named twice"),
        (["champion=50", "9=50"], "has no version 9"),
        (["champion=50", "nightly=50"], "has no version 'nightly'"),
        (["champion=50", "1=50"], "champion and 1 are both version 1"),
    ],
)
def test_a_bad_split_is_a_one_line_error_and_changes_nothing(
    capsys: pytest.CaptureFixture[str],
    model: str,
    routes: RouteStore,
    argv: list[str],
    fragment: str,
) -> None:
    code, out, err = cli(capsys, "split", model, *argv)
    assert_one_line_error(code, err, fragment)
    assert out == ""
    assert routes.get(model) == Route()


def test_split_needs_a_model_that_exists_and_either_variants_or_clear(
    capsys: pytest.CaptureFixture[str], model: str
) -> None:
    code, _, err = cli(capsys, "split", "nope", "champion=90", "candidate=10")
    assert_one_line_error(code, err, "no model named 'nope'")
    for argv in ([model], [model, "champion=90", "candidate=10", "--clear"]):
        code, _, err = cli(capsys, "split", *argv)
        assert code == 2
        assert_one_line_error(code, err, "REF=WEIGHT", "--clear")
    code, _, err = cli(capsys, "split", model, "--clear", "champion=90")
    assert code == 2
    assert_one_line_error(code, err, "unrecognized arguments: champion=90")


def test_shadow_sets_and_stops_the_shadow(
    capsys: pytest.CaptureFixture[str], model: str, routes: RouteStore
) -> None:
    code, out, _ = cli(capsys, "shadow", model, "candidate")
    assert code == 0
    assert out.startswith(f"{model}: candidate (version 2) shadows")
    assert routes.get(model) == Route(shadow="candidate")
    # A split around the shadow keeps it; shadowing a version that serves is refused.
    assert cli(capsys, "split", model, "champion=90", "3=10")[0] == 0
    assert routes.get(model).shadow == "candidate"
    code, _, err = cli(capsys, "shadow", model, "3")
    assert_one_line_error(code, err, "3 is version 3, which already serves traffic")
    code, _, err = cli(capsys, "split", model, "champion=90", "candidate=10")
    assert_one_line_error(code, err, "candidate (version 2) is the shadow")
    code, out, _ = cli(capsys, "shadow", model, "--off")
    assert (code, out) == (0, f"{model}: no shadow\n")
    assert routes.get(model) == Route(split=routes.get(model).split)
    assert routes.get(model).shadow is None


@pytest.mark.parametrize(
    ("argv", "fragment", "exit_code"),
    [
        (["champion"], "version 1, which already serves traffic", 1),
        (["7"], "has no version 7", 1),
        (["bad/ref"], "not an alias or version number: 'bad/ref'", 1),
        ([], "or --off", 2),
        (["candidate", "--off"], "or --off", 2),
    ],
)
def test_a_bad_shadow_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
    model: str,
    routes: RouteStore,
    argv: list[str],
    fragment: str,
    exit_code: int,
) -> None:
    code, _, err = cli(capsys, "shadow", model, *argv)
    assert code == exit_code
    assert_one_line_error(code, err, fragment)
    assert routes.get(model) == Route()


def _counters(ctx: Context, model: str, version: int, **values: int) -> None:
    ctx.redis.hset(ctx.keys.variant_stats(model, version), mapping=values)  # type: ignore[arg-type]


def test_compare_reports_each_variant_and_a_verdict(
    capsys: pytest.CaptureFixture[str], model: str, routes: RouteStore, cli_env: Context
) -> None:
    routes.put(
        model,
        Route(
            split=[Variant(ref="champion", weight=9), Variant(ref="3", weight=1)],
            shadow="candidate",
        ),
    )
    # The champion right 800 times in 1000, the shadow 850, version 3 on too little.
    _counters(
        cli_env, model, 1, predictions=9000, feedback=1000, correct=800, **{"latency:3": 9000}
    )
    _counters(cli_env, model, 2, predictions=10000, feedback=1000, correct=850)
    _counters(cli_env, model, 3, predictions=1000, feedback=99, correct=99)
    code, out, _ = cli(capsys, "compare", model, "--json")
    assert code == 0
    result: dict[str, Any] = json.loads(out)
    assert (result["model"], result["test"], result["min_feedback"]) == (model, TEST, 100)
    by_version = {v["version"]: v for v in result["variants"]}
    champion, shadow, small = by_version[1], by_version[2], by_version[3]
    assert (champion["role"], champion["refs"], champion["traffic"]) == (
        "champion",
        ["champion"],
        0.9,
    )
    assert champion["accuracy"] == 0.8
    assert champion["accuracy_ci95"][0] < 0.8 < champion["accuracy_ci95"][1]
    assert champion["latency_p50_ms"] == pytest.approx(1.5)  # half-way through (1, 2] ms
    assert (shadow["shadow"], shadow["traffic"], shadow["verdict"]) == (
        True,
        0.0,
        "candidate better",
    )
    assert shadow["z"] > 1.96
    assert 0 < shadow["p_value"] < 0.05
    assert (small["traffic"], small["verdict"]) == (0.1, "no difference yet")
    assert [v["version"] for v in result["variants"]] == [1, 3, 2]

    code, out, _ = cli(capsys, "compare", model)
    assert code == 0
    assert "candidate better" in out
    assert out.splitlines()[-1] == f"test: {TEST}"


def test_compare_of_an_unknown_model_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], model: str
) -> None:
    code, _, err = cli(capsys, "compare", "nope")
    assert_one_line_error(code, err, "no model named 'nope'")


def test_promote_bumps_the_route_epoch(
    capsys: pytest.CaptureFixture[str], model: str, routes: RouteStore
) -> None:
    epoch = routes.epoch()
    code, out, _ = cli(capsys, "promote", model, "2")
    assert (code, out) == (0, f"{model} version 2 is now the champion\n")
    assert routes.epoch() == epoch + 1
