"""Client-side rate governors: spend a service's quota at its ceiling, never above it.

Gmail meters each user in quota units per minute (``messages.send`` 100, ``messages.get`` 5...)
and answers 429 once a minute's units are spent; Stripe meters requests per second. Waiting for
those 429s and retrying each one is slow (every worker backs off on its own, at its own pace) and
noisy. Instead every request first takes its cost from a :class:`TokenBucket` shared by all
workers, so the daemon runs at the ceiling without provoking the 429 storm; when one comes all
the same (another client shares the quota), :meth:`TokenBucket.back_off` makes *every* worker
wait, not just the one that met it.

The bucket holds at most ``burst`` units and refills at ``rate`` units a second. In any window of
``period`` seconds it therefore hands out at most ``burst + rate * period`` units; ``for_budget``
chooses the rate so that this is exactly the budget, whichever way the server counts its window
(sliding or fixed), and a single reply (at most ``burst`` units) never waits on an idle bucket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from billing_responder.retry import stop_requested

_SLICE = 0.5
#: A wait shorter than this is none: float rounding must not leave a taker waiting for ever.
_CLOSE_ENOUGH = 1e-6


class TokenBucket:
    """A thread-safe token bucket; :meth:`take` blocks until the units are there."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._cond = threading.Condition()
        self._level = burst  # a fresh start may spend one burst at once
        self._updated = clock()
        self._blocked_until = 0.0
        #: Seconds callers spent waiting in :meth:`take`, in total (for metrics and benchmarks).
        self.waited = 0.0

    @classmethod
    def for_budget(
        cls,
        budget: float,
        period: float,
        *,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> TokenBucket:
        """A bucket that never hands out more than ``budget`` units in any ``period`` seconds."""
        if budget <= burst:
            raise ValueError(f"a budget of {budget:g} leaves nothing beyond the burst")
        return cls((budget - burst) / period, burst, clock=clock, sleep=sleep)

    def take(self, units: float) -> float:
        """Wait until ``units`` may be spent, spend them; the seconds waited.

        A cost above the burst (never one of ours) is charged as the burst, so it cannot wait
        forever. A stop (SIGTERM) ends the wait at once: the request goes out and the caller
        finishes the message in hand, as a stop promises.
        """
        units = min(units, self.burst)
        with self._cond:
            started = self._clock()
            while True:
                now = self._refill()
                wait = max(self._blocked_until - now, (units - self._level) / self.rate)
                if wait <= _CLOSE_ENOUGH or stop_requested():
                    self._level -= units
                    waited = now - started
                    self.waited += waited
                    return waited
                # In slices, so a stop or a back-off is seen within half a second.
                self._pause(min(wait, _SLICE))

    def back_off(self, seconds: float) -> None:
        """The server said "too many": nobody spends anything for ``seconds``, and the bucket
        starts empty after that, so the workers do not all fire again at once."""
        with self._cond:
            now = self._refill()
            self._blocked_until = max(self._blocked_until, now + seconds)
            self._level = min(self._level, 0.0)
            self._cond.notify_all()

    def _refill(self) -> float:
        now = self._clock()
        start = max(self._updated, self._blocked_until)
        if now > start:
            self._level = min(self.burst, self._level + (now - start) * self.rate)
        self._updated = max(self._updated, now)
        return now

    def _pause(self, seconds: float) -> None:
        # Waits with the lock released. A test's fake sleep moves its fake clock instead.
        if self._sleep is None:
            self._cond.wait(seconds)
        else:
            self._cond.release()
            try:
                self._sleep(seconds)
            finally:
                self._cond.acquire()


class Unlimited:
    """A governor that never waits: for ``check``, ``test-reply`` and tests of other things."""

    waited = 0.0

    def take(self, units: float) -> float:
        """Spend nothing, wait for nothing."""
        return 0.0

    def back_off(self, seconds: float) -> None:
        """Ignore the server's "too many"; the retry policy still waits per request."""


#: What a Gmail request may take at once, beyond the steady rate: a whole reply (get 5, send 100,
#: modify 5) plus the poll, so an idle daemon answers a new email without waiting for quota.
GMAIL_BURST_UNITS = 250
#: A Stripe burst, as a share of its per-second limit.
STRIPE_BURST_SHARE = 0.2
STRIPE_LIMITS = {"test": 25, "live": 100}


def gmail_governor(units_per_minute: int) -> TokenBucket:
    """The Gmail quota governor: no minute spends more than ``units_per_minute``."""
    return TokenBucket.for_budget(units_per_minute, 60.0, burst=GMAIL_BURST_UNITS)


def stripe_governor(requests_per_second: float) -> TokenBucket:
    """A Stripe request governor: no second makes more than ``requests_per_second``."""
    burst = max(1.0, requests_per_second * STRIPE_BURST_SHARE)
    return TokenBucket.for_budget(requests_per_second, 1.0, burst=burst)
