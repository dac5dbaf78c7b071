"""Shared fixtures: the repository root and a private service home per test session."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def _quiet_local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
