"""One background thread that runs calls in order: the build's cache writer.

The part of `concurrent.futures.ThreadPoolExecutor(max_workers=1)` the runner
uses, without its imports (`logging` among them: 3.9 ms of a first run's
start-up, against make's 4 ms for a whole one-target build). A call's
exception is kept for `Job.result` to raise in the caller's thread, as a
Future's is.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Job(Generic[T]):
    """A call queued on a `Background`: done or not, then its value or its exception."""

    __slots__ = ("_call", "_done", "_error", "_value")

    def __init__(self, call: Callable[[], T]) -> None:
        self._call = call
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> T:
        """The call's value once it has run (waiting for it); its exception raised here."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set: the call returned


class Background:
    """Calls run one after the other in a thread of their own, started at the first."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Job[object] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, call: Callable[[], T]) -> Job[T]:
        job = Job(call)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put(job)  # type: ignore[arg-type]  # any Job: the thread only runs it
        return job

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            job._run()

    def shutdown(self) -> None:
        """Wait for every call queued so far, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
