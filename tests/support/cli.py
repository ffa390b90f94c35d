"""Running ``forge`` commands, in-process or as a program, and checking their one-line
errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from forge.cli.main import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``forge *argv`` in this process; return its exit code, stdout and stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """A failed command printed one line, no traceback, containing every fragment."""
    assert code != 0
    assert err.count("\n") == 1, err
    assert err.startswith("forge: error: ") or err.startswith("forge ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


REPO = Path(__file__).resolve().parents[2]


def run_forge(
    env: Mapping[str, str], *argv: str, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``forge *argv`` as a program (``python -m forge.cli.main``) in ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "forge.cli.main", *argv],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )
