"""`billing-responder run`: poll on an interval until told to stop.

APScheduler runs the cycle as an interval job (``max_instances=1`` so cycles never overlap,
``coalesce=True`` so a slow cycle is not followed by a burst of catch-up runs), the first one
immediately. SIGTERM/SIGINT set a flag the pipeline checks between messages and end any retry
back-off at once: the message in hand is finished (or, if a call of it was failing, left for the
next start), the rest wait, and the process exits 0. The handlers are installed before start-up
checks run, so a SIGTERM during start-up is a clean stop too.

Start-up (:meth:`Daemon.start_up`) waits out an outage instead of exiting: when building the
service fails with :class:`~billing_responder.errors.ServiceUnavailableError` (Gmail or Stripe
unreachable, or answering 5xx, after the adapters' own retries), it logs one ERROR line and tries
again after 1 s, then 2, 4, 8... seconds, at most 5 minutes apart, until the service is built or
it is told to stop. Exiting instead would spend systemd's start limit (5 starts in 30 minutes) in
a few minutes of outage and leave the unit failed for good. A refused key, lost Gmail
authorisation, a bad config or an unusable database still end the start at once: waiting cannot
fix those.

Under systemd (``Type=notify``) the daemon reports through :mod:`billing_responder.notify`:
``STATUS=`` and ``EXTEND_TIMEOUT_USEC=`` after each failed start-up attempt (the extension covers
the back-off plus 5 minutes for the next attempt, so ``TimeoutStartSec=`` does not kill a start
that is waiting out an outage, but still kills one that hangs), ``READY=1`` when it starts
polling (credentials and labels were verified by then), ``STATUS=`` after every cycle,
``STOPPING=1`` when told to stop, and ``WATCHDOG=1`` every half ``WatchdogSec`` -- but only while
it makes progress: a cycle finished, or a message handled, within the last poll interval plus
``WatchdogSec``. A hung request or a cycle that keeps failing stops the pings, and systemd
restarts the service. systemd arms the watchdog only once start-up completes (``READY=1``), so
no pings are due while start-up retries.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TypeVar

from apscheduler.schedulers.background import BackgroundScheduler

from billing_responder.errors import BillingResponderError, ServiceUnavailableError
from billing_responder.notify import SystemdNotifier
from billing_responder.pipeline import ANSWERED, QUIET, CycleReport, Outcome
from billing_responder.retry import clear_stop, request_stop

log = logging.getLogger(__name__)

Cycle = Callable[..., CycleReport]
T = TypeVar("T")

#: Start-up back-off: the wait after the first failed attempt, doubled after each further one...
START_UP_FIRST_WAIT = 1.0
#: ...up to this many seconds between attempts.
START_UP_MAX_WAIT = 300.0
#: What systemd is asked to allow one start-up attempt, on top of the back-off before it: the
#: unit's ``TimeoutStartSec=`` for the first attempt, this for every later one.
START_UP_ATTEMPT_SECONDS = 300.0


class Daemon:
    """Runs a cycle every ``interval`` seconds until stopped or a fatal error."""

    def __init__(
        self,
        interval: float,
        *,
        on_outcome: Callable[[Outcome], None] = lambda outcome: None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self._interval = interval
        self._on_outcome = on_outcome
        self._notifier = notifier or SystemdNotifier.from_environment()
        self._stop = threading.Event()
        self._previous: dict[int, Any] = {}
        self._last_progress = time.monotonic()
        self._replies = 0
        self.fatal: BillingResponderError | None = None

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the daemon to stop after the message in hand."""
        if not self._stop.is_set():
            self._notifier.stopping()
        self._stop.set()
        request_stop()

    def __enter__(self) -> Daemon:
        clear_stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def start_up(self, build: Callable[[], T]) -> T | None:
        """``build()``, tried again with a growing back-off for as long as a service is unavailable.

        Returns what ``build`` returned, or None when told to stop first (whatever error the
        stop cut short: a clean stop). Any other error ends the start at once.
        """
        failures = 0
        while True:
            try:
                built = build()
            except ServiceUnavailableError as exc:
                if self._stop.is_set():
                    return None
                failures += 1
                self._start_up_failed(exc, failures)
                if self._stop.wait(start_up_wait(failures)):
                    return None
                continue
            except BillingResponderError:
                if self._stop.is_set():
                    return None
                raise
            if failures:
                log.info("started after %d failed attempt(s)", failures)
            return built

    def _start_up_failed(self, exc: ServiceUnavailableError, failures: int) -> None:
        wait = start_up_wait(failures)
        log.error("start-up attempt %d failed, retrying in %g s: %s", failures, wait, exc)
        retry_at = _now(time.time() + wait)
        self._notifier.status(f"starting: {exc}; retrying in {wait:g} s (at {retry_at})")
        extension = round((wait + START_UP_ATTEMPT_SECONDS) * 1_000_000)
        self._notifier.notify(f"EXTEND_TIMEOUT_USEC={extension}")

    def run(self, cycle: Cycle) -> None:
        """Block until SIGTERM/SIGINT or a fatal error; raises the fatal error if any."""
        if self._stop.is_set():
            return

        def job() -> None:
            self._job(cycle)

        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_job(
            job,
            "interval",
            seconds=self._interval,
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
            id="poll",
        )
        self._last_progress = time.monotonic()
        scheduler.start()
        self._notifier.ready(status=f"polling every {self._interval:g} s; first cycle running")
        log.info("polling every %g s; SIGTERM or Ctrl-C stops", self._interval)
        watchdog = self._start_watchdog()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            scheduler.shutdown(wait=True)
            if watchdog is not None:
                watchdog.join()
        if self.fatal is not None:
            self._notifier.status(f"stopped: {self.fatal}")
            raise self.fatal
        log.info("stopped")

    def _job(self, cycle: Cycle) -> None:
        if self._stop.is_set():
            return
        try:
            report = cycle(should_stop=self._stop.is_set, on_outcome=self._outcome)
        except ServiceUnavailableError as exc:
            # An outage is not a reason to die: the next interval tries again. It is not progress
            # either: the watchdog pings stop until a cycle succeeds.
            log.error("cycle failed, will retry in %g s: %s", self._interval, exc)
            self._notifier.status(f"last cycle failed at {_now()}: {exc}; retrying")
            return
        except BillingResponderError as exc:
            self.fatal = exc
            self._stop.set()
            return
        self._last_progress = time.monotonic()
        self._replies += sum(report.count(status) for status in ANSWERED)
        status = f"last cycle {_now()}: {report.summary()}; {self._replies} answered since start"
        capped = capped_reason(report)
        if capped is not None:
            status += f"; replies paused: {capped}"
        self._notifier.status(status)
        if any(o.status not in QUIET for o in report.outcomes):
            log.info("cycle done: %s", report.summary())

    def _outcome(self, outcome: Outcome) -> None:
        # Each message handled is progress: a long first cycle over a backlog is not a hang.
        self._last_progress = time.monotonic()
        self._on_outcome(outcome)

    def _start_watchdog(self) -> threading.Thread | None:
        interval = self._notifier.watchdog_interval_seconds
        if interval is None:
            return None
        thread = threading.Thread(
            target=self._watchdog, args=(interval,), name="watchdog", daemon=True
        )
        thread.start()
        return thread

    def _watchdog(self, interval: float) -> None:
        # WATCHDOG_USEC is twice the interval. Waiting for the next scheduled cycle is not a hang
        # ([schedule] interval_seconds may be longer than WatchdogSec): a hang is no progress
        # for a whole poll interval plus WatchdogSec.
        patience = self._interval + 2 * interval
        stalled = False
        while not self._stop.wait(interval):
            idle = time.monotonic() - self._last_progress
            if idle < patience:
                self._notifier.watchdog()
                stalled = False
            elif not stalled:
                stalled = True
                log.warning(
                    "no progress for %.0f s: no longer telling systemd's watchdog all is well", idle
                )

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("%s received: finishing the message in hand", signal.Signals(signum).name)
        self.stop()


def capped_reason(report: CycleReport) -> str | None:
    """Why this cycle sent billing mail to a person instead of answering it (the hourly breaker
    or the daily cap), or None."""
    for outcome in report.outcomes:
        if outcome.send_cap is not None and outcome.decision is not None:
            return outcome.decision.reasons[-1]
    return None


def start_up_wait(failures: int) -> float:
    """Seconds to wait after ``failures`` failed start-up attempts: 1, 2, 4... at most 300."""
    return min(START_UP_MAX_WAIT, START_UP_FIRST_WAIT * 2.0 ** min(failures - 1, 30))


def _now(timestamp: float | None = None) -> str:
    when = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")
