"""The ready queue over the DAG: which target to check next and which may start now.

Pure bookkeeping, no I/O: the runner asks for the next target whose
dependencies are all finished (in build order, so output is stable), tells
the scheduler which of them must run, and asks which of those may start given
`-j` and the resource pools (as in Ninja: `[pools] gpu = 1` lets one GPU step
run while CPU steps proceed). Targets that are fresh or restored never take a
job slot.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence


class Scheduler:
    """Tracks finished, runnable and running targets of one build."""

    def __init__(
        self,
        order: Sequence[str],
        deps: Mapping[str, Sequence[str]],
        jobs: int,
        pools: Mapping[str, int] | None = None,
        pool_of: Mapping[str, str | None] | None = None,
    ) -> None:
        self.rank = {name: i for i, name in enumerate(order)}
        self.jobs = max(1, jobs)
        self.pool_free = dict(pools or {})
        self.pool_of = dict(pool_of or {})
        self.users: dict[str, list[str]] = {name: [] for name in order}
        self.waiting_on: dict[str, int] = {}
        for name in order:
            needs = [d for d in deps[name] if d in self.rank]
            self.waiting_on[name] = len(needs)
            for need in needs:
                self.users[need].append(name)
        self._checkable = [self.rank[n] for n in order if self.waiting_on[n] == 0]
        heapq.heapify(self._checkable)
        self._runnable: list[int] = []
        self.running: set[str] = set()
        self.order = list(order)

    def next_to_check(self) -> str | None:
        """The first target (in build order) whose dependencies have all finished."""
        if not self._checkable:
            return None
        return self.order[heapq.heappop(self._checkable)]

    def want_run(self, name: str) -> None:
        """`name` is stale: it needs a job slot (and its pool's) to start."""
        heapq.heappush(self._runnable, self.rank[name])

    def startable(self) -> list[str]:
        """Runnable targets that fit in the free job slots and pools, now marked running."""
        started: list[str] = []
        skipped: list[int] = []
        while self._runnable and len(self.running) < self.jobs:
            rank = heapq.heappop(self._runnable)
            name = self.order[rank]
            pool = self.pool_of.get(name)
            if pool is not None:
                if self.pool_free.get(pool, 0) <= 0:
                    skipped.append(rank)
                    continue
                self.pool_free[pool] -= 1
            self.running.add(name)
            started.append(name)
        for rank in skipped:
            heapq.heappush(self._runnable, rank)
        return started

    def drain_runnable(self) -> list[str]:
        """Runnable targets that will not start (the build is stopping)."""
        names = [self.order[rank] for rank in sorted(self._runnable)]
        self._runnable.clear()
        return names

    def finished(self, name: str) -> None:
        """`name` is done (whatever its outcome): release its slot, wake its users."""
        if name in self.running:
            self.running.discard(name)
            pool = self.pool_of.get(name)
            if pool is not None:
                self.pool_free[pool] += 1
        for user in self.users[name]:
            self.waiting_on[user] -= 1
            if self.waiting_on[user] == 0:
                heapq.heappush(self._checkable, self.rank[user])

    @property
    def idle(self) -> bool:
        """Nothing running, runnable or checkable: the build is over."""
        return not (self.running or self._runnable or self._checkable)
