"""The quota governors: at the ceiling, never above it, on a simulated clock (no timing)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from billing_responder.governor import (
    GMAIL_BURST_UNITS,
    TokenBucket,
    gmail_governor,
    stripe_governor,
)
from billing_responder.retry import clear_stop, request_stop

REPLY_UNITS = (5, 100, 5)  # messages.get, messages.send, messages.modify


class SimulatedClock:
    """Time that moves only when someone sleeps; safe to share between threads."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def governed(units_per_minute: int, clock: SimulatedClock) -> TokenBucket:
    real = gmail_governor(units_per_minute)
    return TokenBucket(real.rate, real.burst, clock=clock, sleep=clock.sleep)


def busiest_minute(spent: list[tuple[float, int]]) -> int:
    """The most units spent in any 60-second window (sliding, starting at each spend)."""
    spent = sorted(spent)
    most, total, first = 0, 0, 0
    for stamp, units in spent:
        total += units
        while spent[first][0] <= stamp - 60:
            total -= spent[first][1]
            first += 1
        most = max(most, total)
    return most


def drain(bucket: TokenBucket, clock: SimulatedClock, minutes: float) -> list[tuple[float, int]]:
    spent: list[tuple[float, int]] = []
    end = clock() + minutes * 60
    while clock() < end:
        for units in REPLY_UNITS:
            bucket.take(units)
            spent.append((clock(), units))
    return spent


class TestGmailGovernor:
    @pytest.mark.parametrize("budget", [6000, 15000, 600])
    def test_no_simulated_minute_spends_more_than_the_budget(self, budget: int) -> None:
        """Replying flat out for ten simulated minutes never spends more than the budget in any 60 s."""
        clock = SimulatedClock()
        spent = drain(governed(budget, clock), clock, minutes=10)
        assert busiest_minute(spent) <= budget

    @pytest.mark.parametrize("budget", [6000, 15000])
    def test_a_long_drain_runs_at_the_ceiling(self, budget: int) -> None:
        """Over ten simulated minutes at least 95% of the budget is spent: the governor does not hold back."""
        clock = SimulatedClock()
        start = clock()
        spent = drain(governed(budget, clock), clock, minutes=10)
        per_minute = sum(units for _, units in spent) / ((clock() - start) / 60)
        assert per_minute >= 0.95 * budget

    def test_workers_together_stay_under_the_budget(self) -> None:
        """Four threads taking reply costs at random never spend more than the budget in a simulated minute."""
        clock = SimulatedClock()
        bucket = governed(6000, clock)
        spent: list[tuple[float, int]] = []
        lock = threading.Lock()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            while clock() < 1000 + 300:
                units = rng.choice(REPLY_UNITS)
                bucket.take(units)
                with lock:
                    spent.append((clock(), units))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(spent) > 100
        assert busiest_minute(spent) <= 6000

    def test_one_reply_on_an_idle_mailbox_does_not_wait(self) -> None:
        """A reply's get, send and modify (110 units) go out at once after a quiet spell."""
        clock = SimulatedClock()
        bucket = governed(6000, clock)
        assert sum(bucket.take(units) for units in REPLY_UNITS) == 0
        assert clock() == 1000.0
        assert sum(REPLY_UNITS) <= GMAIL_BURST_UNITS

    def test_a_429_pauses_every_worker(self) -> None:
        """After back_off(10) any taker, not just the one that met the 429, waits until 10 s later."""
        clock = SimulatedClock()
        bucket = governed(6000, clock)
        bucket.back_off(10)
        waited = bucket.take(5)
        assert waited >= 10
        assert clock() >= 1010

    def test_after_a_back_off_the_workers_do_not_all_fire_at_once(self) -> None:
        """The bucket restarts empty after a pause, so the next units come at the steady rate."""
        clock = SimulatedClock()
        bucket = governed(6000, clock)
        bucket.back_off(10)
        bucket.take(5)
        before = clock()
        bucket.take(100)
        assert clock() - before >= 100 / bucket.rate - 0.01

    def test_a_stop_ends_the_wait(self) -> None:
        """Once a stop is requested, a taker spends at once instead of waiting out a long back-off."""
        clock = SimulatedClock()
        bucket = governed(6000, clock)
        bucket.back_off(3600)
        with stopping():
            bucket.take(5)
        assert clock() < 1000 + 3600


class TestStripeGovernor:
    @pytest.mark.parametrize("per_second", [25, 100, 20])
    def test_no_simulated_second_makes_more_requests_than_the_limit(self, per_second: int) -> None:
        """Requests flat out for a simulated minute: no one-second window holds more than the limit."""
        clock = SimulatedClock()
        real = stripe_governor(per_second)
        bucket = TokenBucket(real.rate, real.burst, clock=clock, sleep=clock.sleep)
        stamps: list[float] = []
        while clock() < 1060:
            bucket.take(1)
            stamps.append(clock())
        busiest = max(sum(1 for t in stamps if s <= t < s + 1) for s in stamps)
        assert busiest <= per_second
        assert len(stamps) >= 0.75 * per_second * 60


def test_a_budget_no_bigger_than_the_burst_is_refused() -> None:
    """A bucket whose burst alone would exceed the budget cannot be built."""
    with pytest.raises(ValueError, match="beyond the burst"):
        TokenBucket.for_budget(200, 60, burst=250)


@contextmanager
def stopping() -> Iterator[None]:
    request_stop()
    try:
        yield
    finally:
        clear_stop()
