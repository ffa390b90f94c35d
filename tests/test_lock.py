"""The lock files cover pyproject.toml and agree with each other.

Refreshing them takes minutes (``.ci/lock`` re-resolves everything), so this test checks
them statically: a dependency added to pyproject.toml without a refresh, or a lock that
admits a version outside pyproject.toml's range, fails here instead of on a fresh machine.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PIP_LOCK = ROOT / "requirements-pip.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _pins(lock: Path) -> dict[str, Version]:
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if match := _PIN.match(line):
            pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def _hashed(lock: Path) -> bool:
    """Every pin is followed by at least one --hash line."""
    lines = lock.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if _PIN.match(line)]
    return all(lines[i].endswith("\\") and "--hash=sha256:" in lines[i + 1] for i in starts)


def _requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = list(project["dependencies"])
    for extra in extras:
        names += project["optional-dependencies"][extra]
    return [Requirement(name) for name in names]


def _assert_covers(lock: Path, requirements: list[Requirement], skip: set[str]) -> None:
    pins = _pins(lock)
    for req in requirements:
        name = canonicalize_name(req.name)
        if name in skip:
            continue
        assert name in pins, f"{req.name} is not in {lock.name}: run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name} pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"
        )


def test_the_runtime_lock_covers_the_runtime_dependencies() -> None:
    # torch is the installer's choice of build (CPU or CUDA) of one version: see Dockerfile.
    _assert_covers(RUNTIME_LOCK, _requirements(), skip={"torch"})
    assert "torch" not in _pins(RUNTIME_LOCK)


def test_the_dev_lock_covers_everything_ci_installs() -> None:
    _assert_covers(DEV_LOCK, _requirements("dev", "prefect"), skip=set())


def test_ci_tests_the_torch_the_image_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    image_torch = re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile)
    assert image_torch is not None
    assert _pins(DEV_LOCK)["torch"].public == image_torch[1] == "2.13.0"


def test_both_locks_pin_the_same_versions() -> None:
    runtime, dev = _pins(RUNTIME_LOCK), _pins(DEV_LOCK)
    differ = {name: (v, dev[name]) for name, v in runtime.items() if dev.get(name) != v}
    assert not differ, f"the locks disagree (runtime, dev): {differ}"


def test_the_pip_lock_is_the_dev_locks_pip() -> None:
    """Installs upgrade pip from requirements-pip.lock first; it must be the very pin (and
    hashes) that the dev lock was resolved with."""
    pip_lock = PIP_LOCK.read_text(encoding="utf-8")
    pinned = pip_lock[pip_lock.index("pip==") :].strip()
    assert pinned in DEV_LOCK.read_text(encoding="utf-8")
    assert list(_pins(PIP_LOCK)) == ["pip"]


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, DEV_LOCK, PIP_LOCK], ids=lambda p: p.name)
def test_every_pin_carries_hashes(lock: Path) -> None:
    assert _hashed(lock)


@pytest.mark.parametrize(
    ("path", "lock"),
    [
        (".ci/run", "requirements-pip.lock"),
        (".ci/run", "requirements-dev.lock"),
        ("Dockerfile", "requirements-pip.lock"),
        ("Dockerfile", "requirements.lock"),
        ("README.md", "requirements-pip.lock"),
        ("README.md", "requirements.lock"),
        ("README.md", "requirements-dev.lock"),
    ],
)
def test_installs_go_through_a_lock(path: str, lock: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    assert f"--require-hashes -r {lock}" in text
