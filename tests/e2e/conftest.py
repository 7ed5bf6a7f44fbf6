"""End-to-end runs share one built model (the builder caches by config) and one Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def quickstart() -> Path:
    return Path(__file__).parents[2] / "examples" / "quickstart.yaml"
