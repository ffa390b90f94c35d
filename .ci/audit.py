"""Dependency audit for CI: fail on a known vulnerability that has a fixed release.

pip-audit asks a vulnerability service (PyPI's JSON API). Where that service cannot be
reached, nothing can be audited: say so loudly rather than report a false all-clear,
and do not fail the build for it. Usage: python .ci/audit.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "audit.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip_audit",
                "--local",
                "--skip-editable",
                "--progress-spinner",
                "off",
                "--format",
                "json",
                "--output",
                str(report),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            deps = json.loads(report.read_text())["dependencies"]
        except (OSError, ValueError, KeyError):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"!! pip-audit did not run ({tail}): dependency audit SKIPPED", file=sys.stderr)
            return 0
    vulns = [(d["name"], d["version"], v) for d in deps for v in d.get("vulns", [])]
    for name, version, vuln in vulns:
        fixes = ", ".join(vuln["fix_versions"]) or "no fixed release yet"
        print(f"{name} {version}: {vuln['id']} (fixed in {fixes})")
    skipped = [d["name"] for d in deps if "skip_reason" in d]
    if skipped and len(skipped) == len(deps):
        print(
            "!! pip-audit reached no vulnerability data: dependency audit SKIPPED", file=sys.stderr
        )
    elif skipped:
        print(f"!! pip-audit could not audit: {', '.join(skipped)}", file=sys.stderr)
    else:
        print(f"audited {len(deps)} packages, {len(vulns)} known vulnerabilities")
    return 1 if any(v["fix_versions"] for _, _, v in vulns) else 0


if __name__ == "__main__":
    sys.exit(main())
