"""Rank pools shared by the distributed tests: spawned once per module, closed at its end."""

from __future__ import annotations

import pytest

from pool import RankPool


@pytest.fixture(scope="module")
def pool2():
    """Two gloo ranks."""
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4():
    """Four gloo ranks (a 2x2 mesh for the hybrid strategies)."""
    pool = RankPool(4)
    yield pool
    pool.close()
