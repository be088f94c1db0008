"""`billing-responder run`: poll on an interval until told to stop.

APScheduler runs the cycle as an interval job (``max_instances=1`` so cycles never overlap,
``coalesce=True`` so a slow cycle is not followed by a burst of catch-up runs), the first one
immediately. SIGTERM/SIGINT set a flag the pipeline checks between messages and end any retry
back-off at once: the message in hand is finished (or, if a call of it was failing, left for the
next start), the rest wait, and the process exits 0. The handlers are installed before start-up
checks run, so a SIGTERM during start-up is a clean stop too.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from billing_responder.errors import BillingResponderError, ServiceUnavailableError
from billing_responder.pipeline import QUIET, CycleReport, Outcome
from billing_responder.retry import clear_stop, request_stop

log = logging.getLogger(__name__)

Cycle = Callable[..., CycleReport]


class Daemon:
    """Runs a cycle every ``interval`` seconds until stopped or a fatal error."""

    def __init__(
        self,
        interval: float,
        *,
        on_outcome: Callable[[Outcome], None] = lambda outcome: None,
    ) -> None:
        self._interval = interval
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self._previous: dict[int, Any] = {}
        self.fatal: BillingResponderError | None = None

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the daemon to stop after the message in hand."""
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
        scheduler.start()
        log.info("polling every %g s; SIGTERM or Ctrl-C stops", self._interval)
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            scheduler.shutdown(wait=True)
        if self.fatal is not None:
            raise self.fatal
        log.info("stopped")

    def _job(self, cycle: Cycle) -> None:
        if self._stop.is_set():
            return
        try:
            report = cycle(should_stop=self._stop.is_set, on_outcome=self._on_outcome)
        except ServiceUnavailableError as exc:
            # An outage is not a reason to die: the next interval tries again.
            log.error("cycle failed, will retry in %g s: %s", self._interval, exc)
            return
        except BillingResponderError as exc:
            self.fatal = exc
            self._stop.set()
            return
        if any(o.status not in QUIET for o in report.outcomes):
            log.info("cycle done: %s", report.summary())

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("%s received: finishing the message in hand", signal.Signals(signum).name)
        self.stop()
