"""Bounded concurrency for the per-message work, and the claims that keep it exactly-once.

Answering one email is mostly waiting: for Gmail, for Stripe, for Gmail again. A few workers
hide that waiting; the quota governors (``governor.py``), not the worker count, set the pace.

What the workers share is kept safe in two ways. :class:`Claims` lets one worker at a time hold
a thread or a sender, so the per-thread and per-sender limits see every earlier reply, made or
in flight, exactly as they would one message after another. Global ceilings (the breaker, the
daily cap) are checked and the reply's intent recorded as one step under a lock in the pipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Claims:
    """Names (a thread id, a sender) held by one worker at a time; others wait their turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        """Hold every one of ``names`` for the block, waiting while another worker holds any."""
        with self._cond:
            while not self._held.isdisjoint(names):
                self._cond.wait()
            self._held.update(names)
        try:
            yield
        finally:
            with self._cond:
                self._held.difference_update(names)
                self._cond.notify_all()


class WorkerPool:
    """Runs one function over a stream of items, at most ``workers`` at a time."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None

    def run(
        self,
        items: Iterable[T],
        work: Callable[[T], R],
        *,
        should_stop: Callable[[], bool],
        on_result: Callable[[R], None],
    ) -> bool:
        """``work`` each item; ``on_result`` each result, on the calling thread, as they finish.

        An item is taken from ``items`` only when a worker is free, so a listing that is read
        page by page is read no further ahead than the work. Once ``should_stop()`` says so no
        item is started; those in hand are finished. An error from ``work``, ``on_result`` or
        ``items`` also ends the starting, and is raised once those in hand are finished.
        Returns whether every item was done (False: stopped early).
        """
        if self.workers == 1:
            for item in items:
                if should_stop():
                    return False
                on_result(work(item))
            return True
        executor = self._executor_now()
        pending = iter(items)
        in_flight: set[Future[R]] = set()
        error: BaseException | None = None
        stopped = exhausted = False
        while True:
            while error is None and not (stopped or exhausted) and len(in_flight) < self.workers:
                if should_stop():
                    stopped = True
                    break
                try:
                    item = next(pending)
                except StopIteration:
                    exhausted = True
                    break
                except BaseException as exc:  # the listing failed: finish the rest in hand
                    error = exc
                    break
                in_flight.add(executor.submit(work, item))
            if not in_flight:
                break
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    on_result(future.result())
                except BaseException as exc:
                    error = error or exc
        if error is not None:
            raise error
        return not stopped

    def close(self) -> None:
        """Let the worker threads end (after the work in hand)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _executor_now(self) -> ThreadPoolExecutor:
        if self._executor is None:
            # Threads live as long as the pool: each keeps its Gmail and Stripe connections open
            # from one cycle to the next.
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="worker")
        return self._executor
