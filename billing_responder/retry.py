"""How billing-responder retries a failed call: one mechanism, one policy per service.

The adapters own the question "is this error worth retrying?" (they alone know their client's
exceptions); this module owns "how": exponential back-off with jitter, honouring the server's
``Retry-After``, a bounded number of attempts, then the last error is raised for the adapter to
map. A message whose call still fails is left for the next cycle, so attempts here stay few.

Waiting is interruptible: once :func:`request_stop` is called (SIGTERM), no back-off sleeps on
and no further attempt is made, so a daemon asked to stop does not spend its shutdown budget
waiting out a Retry-After; the call's error goes up and the message waits for the next start.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

log = logging.getLogger(__name__)

T = TypeVar("T")

_stop = threading.Event()


def request_stop() -> None:
    """Make every pending and future back-off end now, without another attempt."""
    _stop.set()


def stop_requested() -> bool:
    """Whether :func:`request_stop` was called."""
    return _stop.is_set()


def clear_stop() -> None:
    """Allow retries again (a new daemon in the same process, e.g. in tests)."""
    _stop.clear()


def _interruptible_sleep(seconds: float) -> None:
    _stop.wait(seconds)


#: Told the policy's service name before each retry (an attempt after a failed one): metrics.
_retry_observers: list[Callable[[str], None]] = []


def observe_retries(observer: Callable[[str], None]) -> Callable[[], None]:
    """Call ``observer(service)`` before every retry of any policy; returns what undoes it."""
    _retry_observers.append(observer)

    def forget() -> None:
        if observer in _retry_observers:
            _retry_observers.remove(observer)

    return forget


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one service is retried."""

    service: str
    retryable: Callable[[BaseException], bool]
    retry_after: Callable[[BaseException], float | None]
    attempts: int = 4
    initial_wait: float = 0.5
    max_wait: float = 8.0
    #: A longer Retry-After than this is not waited out inside a cycle: the message is deferred.
    max_retry_after: float = 60.0

    def call(
        self, fn: Callable[[], T], *, sleep: Callable[[float], None] = _interruptible_sleep
    ) -> T:
        """Run ``fn``, retrying per this policy; re-raise the last error when out of attempts."""

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            told = self.retry_after(exc) if exc is not None else None
            computed = self.backoff(state.attempt_number)
            return computed if told is None else max(computed, min(told, self.max_retry_after))

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s call failed (%s), attempt %d of %d; retrying in %.1f s",
                self.service,
                _short(exc),
                state.attempt_number,
                self.attempts,
                state.upcoming_sleep,
            )

        failed: list[BaseException] = []

        def attempt() -> T:
            # Tenacity decides to retry before it sleeps; a stop that ends the sleep early must
            # also cancel the attempt that would follow it.
            if failed and _stop.is_set():
                raise failed[-1]
            if failed:
                # Counted here, not in before_sleep: a back-off cut short by a stop is no retry.
                for observer in tuple(_retry_observers):
                    observer(self.service)
            try:
                return fn()
            except BaseException as exc:
                failed.append(exc)
                raise

        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait,
            retry=retry_if_exception(self._worth_retrying),
            reraise=True,
            sleep=sleep,
            before_sleep=before_sleep,
        )
        return retrying(attempt)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), jitter included.

        Exponential (initial, 2x, 4x... capped at ``max_wait``) plus up to ``initial_wait`` of
        random jitter, so many clients that failed together do not retry together.
        """
        exponential = min(self.max_wait, self.initial_wait * 2.0 ** (attempt - 1))
        return exponential + random.uniform(0, self.initial_wait)  # noqa: S311 - not crypto

    def _worth_retrying(self, exc: BaseException) -> bool:
        if _stop.is_set() or not self.retryable(exc):
            return False
        told = self.retry_after(exc)
        return told is None or told <= self.max_retry_after


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"
