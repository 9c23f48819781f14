"""Shared pytest fixtures. Fixture modules live in tests/support/ and are registered here."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.support.fixtures", "tests.support.model_fixtures"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The engine's tests (tests/sdedit) first, then the rest in their usual order: the engine
    is what everything else stands on, and its torch.compile tests trace in a process not yet
    crowded by the run path's Ray drivers, threads and models (5x slower after them)."""
    items.sort(key=lambda item: 0 if "/tests/sdedit/" in str(item.path) else 1)
