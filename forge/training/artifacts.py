"""Local copies of registered models' files, downloaded once per version.

A version's artifacts never change, so a complete copy is reused as is. Copies are
downloaded beside their final place and renamed into it, so a reader never sees a
half-downloaded model, and two processes fetching one version both end up with a
complete copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fetch(artifact_uri: str, target: Path, tracking_uri: str) -> Path:
    """The directory ``artifact_uri`` as a local folder at ``target``."""
    if target.is_dir():
        return target
    # MLflow draws a tqdm bar on stderr for every download: noise in `forge predict`
    # and in worker logs. It reads this variable when it downloads, not at import.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(staging), tracking_uri=tracking_uri
        )
        try:
            os.replace(local, target)
        except OSError:
            if not target.is_dir():  # not a racing download that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
