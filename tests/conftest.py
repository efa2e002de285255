import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session decodes datasets into its own cache; tests never touch the user's cache."""
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("VAELAB_DATA", raising=False)


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, where ../shared/datasets is the default data root."""
    monkeypatch.chdir(REPO)
    return REPO


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED / "MNIST" / "raw").is_dir():
        raise RuntimeError(f"real datasets expected at {SHARED} (see its README); the test suite needs them")
    return SHARED
