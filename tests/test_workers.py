"""The worker pool and claims: bounded, lazy, stoppable, and one holder per name."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from billing_responder.workers import Claims, WorkerPool


class Gauge:
    """Counts how many are inside at once, and the most there ever were."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.most = 0

    def enter(self) -> None:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    workers = WorkerPool(4)
    yield workers
    workers.close()


class TestWorkerPool:
    def test_at_most_workers_items_are_in_hand_at_once(self, pool: WorkerPool) -> None:
        """Four workers never have more than four items in hand, and do use more than one."""
        gauge = Gauge()
        release = threading.Event()

        def work(item: int) -> int:
            gauge.enter()
            release.wait(0.05)
            gauge.leave()
            return item

        results: list[int] = []
        assert pool.run(range(40), work, should_stop=lambda: False, on_result=results.append)
        assert sorted(results) == list(range(40))
        assert 1 < gauge.most <= 4

    def test_items_are_read_no_further_ahead_than_the_work(self, pool: WorkerPool) -> None:
        """An item is taken from the stream only when a worker is free: never more than four ahead of what finished."""
        finished: list[int] = []
        ahead: list[int] = []

        def stream() -> Iterator[int]:
            for item in range(200):
                ahead.append(item - len(finished))
                yield item

        pool.run(stream(), lambda item: item, should_stop=lambda: False, on_result=finished.append)
        assert len(finished) == 200
        assert max(ahead) <= 4

    def test_results_are_reported_on_the_calling_thread(self, pool: WorkerPool) -> None:
        """on_result runs on the thread that called run(), whichever worker did the work."""
        threads: set[str] = set()
        workers: set[str] = set()

        def work(item: int) -> int:
            workers.add(threading.current_thread().name)
            return item

        pool.run(
            range(20),
            work,
            should_stop=lambda: False,
            on_result=lambda _: threads.add(threading.current_thread().name),
        )
        assert threads == {threading.current_thread().name}
        assert all(name.startswith("worker") for name in workers)

    def test_a_stop_starts_nothing_more_and_finishes_what_is_in_hand(
        self, pool: WorkerPool
    ) -> None:
        """After should_stop() turns true no item is started; the ones started all finish; run() says False."""
        started: list[int] = []
        finished: list[int] = []
        lock = threading.Lock()

        def work(item: int) -> int:
            with lock:
                started.append(item)
            threading.Event().wait(0.01)
            return item

        done = pool.run(
            range(100), work, should_stop=lambda: len(finished) >= 10, on_result=finished.append
        )
        assert done is False
        assert sorted(finished) == sorted(started)
        assert 10 <= len(finished) < 100

    def test_an_error_is_raised_after_the_items_in_hand_finish(self, pool: WorkerPool) -> None:
        """A failing item stops the starting; the others in hand still report; then the error is raised."""
        finished: list[int] = []

        def work(item: int) -> int:
            if item == 5:
                raise RuntimeError("boom")
            threading.Event().wait(0.01)
            return item

        with pytest.raises(RuntimeError, match="boom"):
            pool.run(range(100), work, should_stop=lambda: False, on_result=finished.append)
        assert 5 not in finished
        assert len(finished) < 99

    def test_a_failing_stream_is_raised_after_the_items_in_hand_finish(
        self, pool: WorkerPool
    ) -> None:
        """A listing that fails mid-way (say, page 2) lets the items already started report first."""
        finished: list[int] = []

        def stream() -> Iterator[int]:
            yield from range(3)
            raise ConnectionError("page 2")

        with pytest.raises(ConnectionError, match="page 2"):
            pool.run(stream(), lambda i: i, should_stop=lambda: False, on_result=finished.append)
        assert sorted(finished) == [0, 1, 2]

    def test_one_worker_works_in_order_on_the_calling_thread(self) -> None:
        """workers = 1 handles items one after the other, in the stream's order, without threads."""
        seen: list[tuple[int, str]] = []
        single = WorkerPool(1)
        single.run(
            range(5),
            lambda i: (i, threading.current_thread().name),
            should_stop=lambda: False,
            on_result=seen.append,
        )
        assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
        assert {name for _, name in seen} == {threading.current_thread().name}


class TestClaims:
    def test_a_name_has_one_holder_at_a_time(self) -> None:
        """Eight threads claiming the same sender are inside one at a time."""
        claims = Claims()
        gauge = Gauge()

        def worker() -> None:
            for _ in range(20):
                with claims.hold("sender ada@example.com"):
                    gauge.enter()
                    threading.Event().wait(0.001)
                    gauge.leave()

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert gauge.most == 1

    def test_different_names_are_held_at_once(self) -> None:
        """Claims on different threads do not wait for each other."""
        claims = Claims()
        with claims.hold("thread a"):
            entered = threading.Event()

            def other() -> None:
                with claims.hold("thread b"):
                    entered.set()

            thread = threading.Thread(target=other)
            thread.start()
            assert entered.wait(5)
            thread.join()
