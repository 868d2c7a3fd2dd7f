"""The executor registry: each kind of `[executor] kind` / `--executor` and how to make it.

The runner creates its executor only here (`make_executor`), from an
ExecutorContext; the contract every executor keeps is `base.Executor`.
A factory imports its module when called, so a build that runs nothing
imports no executor, and Ray is imported only when `ray` is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mlbuild.errors import UsageError

if TYPE_CHECKING:
    from mlbuild.exec.base import Executor, ExecutorContext

ExecutorFactory = Callable[["ExecutorContext"], "Executor"]

_FACTORIES: dict[str, ExecutorFactory] = {}


def register_executor(kind: str, factory: ExecutorFactory) -> ExecutorFactory | None:
    """Make `kind` an executor; returns the factory it replaces, if any (to wrap or put back)."""
    previous = _FACTORIES.get(kind)
    _FACTORIES[kind] = factory
    return previous


def executor_kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_FACTORIES)


def make_executor(kind: str, context: ExecutorContext) -> Executor:
    """A new executor of `kind`; a UsageError naming the known kinds if there is none."""
    factory = _FACTORIES.get(kind)
    if factory is None:
        known = ", ".join(executor_kinds())
        raise UsageError(f"unknown executor '{kind}': the known executors are {known}")
    return factory(context)


def _local(context: ExecutorContext) -> Executor:
    from mlbuild.exec.local import LocalExecutor

    return LocalExecutor(context.root)


def _ray(context: ExecutorContext) -> Executor:
    from mlbuild.exec.ray import RayExecutor

    return RayExecutor(context)


register_executor("local", _local)
register_executor("ray", _ray)
