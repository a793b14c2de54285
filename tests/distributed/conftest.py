"""Rank pools shared by the distributed tests.

The two-rank pool is spawned once per session and shared by every module that sends it tasks (the
parity cells, the planner, the driver runs): spawning it and its ranks' first imports cost as much as a
torchrun launch. A pool that a timed-out task killed is replaced by a fresh one for the next test, so
one hung task fails one test, not the rest of the session. The four-rank pool serves one module; at its
end the ranks are asked to stop and leave while the next tests run, and are waited for at session end.
"""

from __future__ import annotations

import pytest

from pool import RankPool


class RankPools:
    """Live pools by world size: ``get(world)`` returns the running pool, or starts one (again)."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}
        self._retired: list[RankPool] = []

    def get(self, world: int) -> RankPool:
        """The running pool of ``world`` ranks; a new one where there is none or the last one was killed."""
        pool = self._pools.get(world)
        if pool is None or pool.broken:
            pool = self._pools[world] = RankPool(world)
        return pool

    def retire(self, world: int) -> None:
        """Ask the pool of ``world`` ranks to stop, without waiting; ``close`` waits for it."""
        pool = self._pools.pop(world, None)
        if pool is not None:
            pool.close(wait=False)
            self._retired.append(pool)

    def close(self) -> None:
        """Stop every pool (politely: barrier, destroy the group), all at once, and wait for their ranks."""
        for world in list(self._pools):
            self.retire(world)
        for pool in self._retired:
            pool.join()
        self._retired.clear()


@pytest.fixture(scope="session")
def rank_pools():
    """The session's pools; a module-scoped fixture that needs ranks takes its pool from here."""
    pools = RankPools()
    yield pools
    pools.close()


@pytest.fixture
def pool2(rank_pools: RankPools) -> RankPool:
    """Two gloo ranks (the session's pool)."""
    return rank_pools.get(2)


@pytest.fixture(scope="module")
def pool4(rank_pools: RankPools):
    """Four gloo ranks (a 2x2 mesh for the hybrid strategies), for one module."""
    yield rank_pools.get(4)
    rank_pools.retire(4)
