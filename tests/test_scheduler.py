"""The ready queue (scheduler.py) on its own: dependency order, `-j`, pools, and the build's end.

The runner drives it as `_loop` does: `next_to_check` until None, `want_run`
for the stale, `finished` for the fresh, `startable` for what may start now,
and `finished` again when a step ends (whatever its outcome).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlbuild.scheduler import Scheduler

# prep and data have no dependencies; train needs both; evaluate needs train.
ORDER = ("prep", "data", "train", "evaluate")
DEPS: Mapping[str, Sequence[str]] = {
    "prep": (),
    "data": (),
    "train": ("prep", "data"),
    "evaluate": ("train",),
}


def checkable(sched: Scheduler) -> list[str]:
    """Every target ready to be checked now, in the order the scheduler gives them."""
    names = []
    while (name := sched.next_to_check()) is not None:
        names.append(name)
    return names


def independent(*names: str) -> dict[str, tuple[str, ...]]:
    return {name: () for name in names}


def one_gpu(*order: str) -> Scheduler:
    """Independent targets, all in a pool of one `gpu`, with job slots to spare."""
    pool_of: dict[str, str | None] = {name: "gpu" for name in order}
    return Scheduler(order, independent(*order), jobs=3, pools={"gpu": 1}, pool_of=pool_of)


# -- order -------------------------------------------------------------------------------


def test_a_target_is_checked_only_once_all_its_dependencies_finished() -> None:
    sched = Scheduler(ORDER, DEPS, jobs=1)
    assert checkable(sched) == ["prep", "data"]
    sched.finished("prep")
    assert checkable(sched) == []  # train still waits on data
    sched.finished("data")
    assert checkable(sched) == ["train"]
    sched.finished("train")
    assert checkable(sched) == ["evaluate"]


def test_ready_targets_come_in_build_order_not_in_the_order_they_became_ready() -> None:
    order = ("a", "b", "uses_a", "uses_b")
    deps = {"a": (), "b": (), "uses_a": ("a",), "uses_b": ("b",)}
    sched = Scheduler(order, deps, jobs=2)
    assert checkable(sched) == ["a", "b"]
    sched.finished("b")
    sched.finished("a")
    assert checkable(sched) == ["uses_a", "uses_b"]


def test_dependencies_outside_the_selection_are_not_waited_for() -> None:
    sched = Scheduler(("train",), {"train": ("prep",)}, jobs=1)
    assert checkable(sched) == ["train"]


# -- -j ----------------------------------------------------------------------------------


def test_no_more_steps_start_than_jobs_allow() -> None:
    sched = Scheduler(("a", "b", "c"), independent("a", "b", "c"), jobs=2)
    for name in checkable(sched):
        sched.want_run(name)
    assert sched.startable() == ["a", "b"]
    assert sched.startable() == []
    assert sched.running == {"a", "b"}
    sched.finished("b")
    assert sched.startable() == ["c"]
    assert sched.running == {"a", "c"}


def test_jobs_below_one_still_run_one_step() -> None:
    sched = Scheduler(("a", "b"), independent("a", "b"), jobs=0)
    for name in checkable(sched):
        sched.want_run(name)
    assert sched.startable() == ["a"]
    sched.finished("a")
    assert sched.startable() == ["b"]


def test_fresh_targets_take_no_job_slot() -> None:
    sched = Scheduler(("fresh", "stale"), independent("fresh", "stale"), jobs=1)
    assert checkable(sched) == ["fresh", "stale"]
    sched.want_run("stale")
    sched.finished("fresh")  # decided fresh before anything started
    assert sched.startable() == ["stale"]


# -- pools -------------------------------------------------------------------------------


def test_a_pool_limits_its_steps_while_others_start() -> None:
    order = ("gpu1", "gpu2", "cpu")
    sched = Scheduler(
        order,
        independent(*order),
        jobs=3,
        pools={"gpu": 1},
        pool_of={"gpu1": "gpu", "gpu2": "gpu", "cpu": None},
    )
    for name in checkable(sched):
        sched.want_run(name)
    assert sched.startable() == ["gpu1", "cpu"]
    assert sched.startable() == []  # gpu2 waits for the pool, not for a job slot
    sched.finished("cpu")
    assert sched.startable() == []
    sched.finished("gpu1")
    assert sched.startable() == ["gpu2"]


def test_a_target_of_a_pool_that_never_ran_gives_the_pool_nothing_back() -> None:
    sched = one_gpu("fresh", "gpu1", "gpu2")
    assert checkable(sched) == ["fresh", "gpu1", "gpu2"]
    sched.finished("fresh")  # fresh: it never took the pool's slot
    sched.want_run("gpu1")
    sched.want_run("gpu2")
    assert sched.startable() == ["gpu1"]


def test_a_step_waiting_for_its_pool_keeps_its_place_in_build_order() -> None:
    sched = one_gpu("gpu1", "gpu2", "gpu3")
    for name in reversed(checkable(sched)):
        sched.want_run(name)
    assert sched.startable() == ["gpu1"]
    sched.finished("gpu1")
    assert sched.startable() == ["gpu2"]
    sched.finished("gpu2")
    assert sched.startable() == ["gpu3"]


# -- a step's end ------------------------------------------------------------------------


def test_a_step_that_ends_frees_its_slot_and_releases_its_dependents() -> None:
    """The scheduler does not know outcomes: a failed step is `finished` too, and the
    runner tells its dependents they were not run when it checks them."""
    sched = Scheduler(ORDER, DEPS, jobs=1)
    for name in checkable(sched):
        sched.want_run(name)
    assert sched.startable() == ["prep"]
    sched.finished("prep")  # failed, say
    assert sched.startable() == ["data"]
    assert checkable(sched) == []
    sched.finished("data")
    assert sched.running == set()
    assert checkable(sched) == ["train"]


def test_drain_runnable_gives_what_will_not_start_in_build_order() -> None:
    order = ("a", "b", "c", "d")
    sched = Scheduler(order, independent(*order), jobs=1)
    checkable(sched)
    for name in ("d", "b", "a", "c"):
        sched.want_run(name)
    assert sched.drain_runnable() == ["a", "b", "c", "d"]
    assert sched.drain_runnable() == []
    assert sched.startable() == []  # drained: nothing is left to start
    for name in order:
        sched.finished(name)  # the runner reports each as not run
    assert sched.idle


# -- the build's end ---------------------------------------------------------------------


def test_idle_only_when_nothing_is_checkable_runnable_or_running() -> None:
    sched = Scheduler(("a", "b"), {"a": (), "b": ("a",)}, jobs=1)
    assert not sched.idle  # a is checkable
    assert checkable(sched) == ["a"]
    sched.want_run("a")
    assert not sched.idle  # a is runnable
    assert sched.startable() == ["a"]
    assert not sched.idle  # a is running
    sched.finished("a")
    assert not sched.idle  # b became checkable
    assert checkable(sched) == ["b"]
    sched.finished("b")  # fresh
    assert sched.idle


def test_an_empty_selection_is_idle_from_the_start() -> None:
    sched = Scheduler((), {}, jobs=4)
    assert sched.idle
    assert sched.next_to_check() is None
    assert sched.startable() == []


def test_a_whole_build_starts_every_stale_target_once_in_dependency_order() -> None:
    """The runner's loop, with every target stale and steps ending in the order they began."""
    sched = Scheduler(ORDER, DEPS, jobs=2)
    started: list[str] = []
    for _ in range(len(ORDER) + 1):  # bounded: a scheduler that never idles fails, not hangs
        if sched.idle:
            break
        for name in checkable(sched):
            sched.want_run(name)
        now = sched.startable()
        started += now
        for name in now:
            sched.finished(name)
    assert sched.idle
    assert started == ["prep", "data", "train", "evaluate"]


def test_can_start_and_checkable_follow_slots_pools_and_the_queue() -> None:
    deps: dict[str, list[str]] = {"a": [], "b": [], "g": [], "c": ["a"]}
    sched = Scheduler(["a", "b", "g", "c"], deps, jobs=1, pools={"gpu": 0}, pool_of={"g": "gpu"})
    assert sched.checkable and not sched.can_start()
    assert [sched.next_to_check() for _ in range(3)] == ["a", "b", "g"]
    assert not sched.checkable  # c waits for a
    sched.want_run("g")
    assert not sched.can_start()  # its pool has no room
    sched.want_run("a")
    assert sched.can_start()
    assert sched.startable() == ["a"]
    sched.want_run("b")
    assert not sched.can_start()  # the one slot is taken
    sched.finished("a")
    assert sched.checkable and sched.can_start()


def test_a_step_over_gives_its_slot_early_only_to_what_comes_first_in_build_order() -> None:
    # upper <- first_line; greet stands alone, after first_line in build order.
    order = ("upper", "first_line", "greet", "other")
    deps = {"upper": (), "first_line": ("upper",), "greet": (), "other": ()}
    sched = Scheduler(order, deps, jobs=1)
    assert sched.next_to_check() == "upper"
    sched.want_run("upper")
    assert sched.startable() == ["upper"]
    assert sched.next_to_check() == "greet"  # checked while upper runs
    sched.want_run("greet")
    # first_line (upper's user) comes before greet: greet waits for upper to be recorded.
    assert sched.start_early("upper") == []
    assert not sched.running  # the slot is free all the same
    sched.finished("upper")
    assert not sched.start_first()  # first_line is still to be checked, and comes first
    assert sched.next_to_check() == "first_line"
    sched.want_run("first_line")
    assert sched.start_first()
    assert sched.startable() == ["first_line"]
    # Nothing left to check before greet, and first_line has no users: greet may go early.
    assert sched.start_early("first_line") == ["greet"]
    assert sched.running == {"greet"}
    sched.finished("first_line")
    assert sched.running == {"greet"}  # finishing first_line did not free greet's slot
