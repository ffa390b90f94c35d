"""The packaged embedding model, loaded once per test session.

Use from a test module with ``pytest_plugins = ["tests.model_fixtures"]``.
"""

from __future__ import annotations

import pytest

from forge.embedding.model import Embedder


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder.load(device="cpu")
