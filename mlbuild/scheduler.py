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
        self._runnable: list[int] = []  # ranks of runnable targets in no pool
        # Per pool, its runnable targets' ranks: a full pool's waiting targets are not
        # looked at again at every start (a 10,000-target `gpu = 1` pool was quadratic).
        self._pooled: dict[str, list[int]] = {}
        self.running: set[str] = set()
        self.order = list(order)

    def next_to_check(self) -> str | None:
        """The first target (in build order) whose dependencies have all finished."""
        if not self._checkable:
            return None
        return self.order[heapq.heappop(self._checkable)]

    def want_run(self, name: str) -> None:
        """`name` is stale: it needs a job slot (and its pool's) to start."""
        pool = self.pool_of.get(name)
        heap = self._runnable if pool is None else self._pooled.setdefault(pool, [])
        heapq.heappush(heap, self.rank[name])

    def _head(self) -> tuple[list[int], str | None] | None:
        """The queue whose head starts next, and its pool: the first runnable target in
        build order whose pool (if any) has room. None if no target can start."""
        heap = self._runnable if self._runnable else None
        chosen: str | None = None
        for pool, waiting in self._pooled.items():
            if (
                waiting
                and self.pool_free.get(pool, 0) > 0
                and (heap is None or waiting[0] < heap[0])
            ):
                heap, chosen = waiting, pool
        return None if heap is None else (heap, chosen)

    def startable(self, before: int | None = None) -> list[str]:
        """Runnable targets that fit in the free job slots and pools, now marked running.

        They start in build order: each slot goes to the first runnable target
        whose pool (if any) has room; with `before`, only targets ranked before it.
        """
        started: list[str] = []
        while len(self.running) < self.jobs:
            head = self._head()
            if head is None or (before is not None and head[0][0] >= before):
                break
            heap, chosen = head
            name = self.order[heapq.heappop(heap)]
            if chosen is not None:
                self.pool_free[chosen] -= 1
            self.running.add(name)
            started.append(name)
        return started

    def can_start(self) -> bool:
        """Whether `startable` would start something now: a free slot has a target for it."""
        return len(self.running) < self.jobs and self._head() is not None

    def start_first(self) -> bool:
        """Whether a target can start before any more are checked: one for a free slot that
        comes, in build order, before every target still to check (checking those first
        keeps the order steps start in the build order)."""
        if len(self.running) >= self.jobs or (head := self._head()) is None:
            return False
        return not self._checkable or head[0][0] < self._checkable[0]

    @property
    def checkable(self) -> bool:
        """Some target has all its dependencies finished and is not decided yet."""
        return bool(self._checkable)

    def drain_runnable(self) -> list[str]:
        """Runnable targets that will not start (the build is stopping)."""
        ranks = [*self._runnable, *(r for heap in self._pooled.values() for r in heap)]
        self._runnable.clear()
        self._pooled.clear()
        return [self.order[rank] for rank in sorted(ranks)]

    def start_early(self, name: str) -> list[str]:
        """`name`'s step is over: the targets that take its slot before it is recorded.

        Only runnable targets that come, in build order, before every target
        still to be checked and every user of `name` (which `finished` wakes):
        the ones `finished` then `startable` would have started, so that the
        order steps start in stays the build order (at -j 1, exactly).
        """
        self.release(name)
        bound = [self._checkable[0]] if self._checkable else []
        users = self.users[name]
        if users:
            bound.append(self.rank[users[0]])  # users are listed in build order
        return self.startable(min(bound) if bound else None)

    def release(self, name: str) -> None:
        """`name`'s step is over: its slot (and its pool's) is free; its users still wait."""
        if name in self.running:
            self.running.discard(name)
            pool = self.pool_of.get(name)
            if pool is not None:
                self.pool_free[pool] += 1

    def finished(self, name: str) -> None:
        """`name` is done (whatever its outcome): release its slot, wake its users."""
        self.release(name)
        for user in self.users[name]:
            self.waiting_on[user] -= 1
            if self.waiting_on[user] == 0:
                heapq.heappush(self._checkable, self.rank[user])

    @property
    def idle(self) -> bool:
        """Nothing running, runnable or checkable: the build is over."""
        pooled = any(self._pooled.values())
        return not (self.running or self._runnable or pooled or self._checkable)
