"""`billing-responder run`: poll on an interval until told to stop.

APScheduler runs the cycle as an interval job (``max_instances=1`` so cycles never overlap,
``coalesce=True`` so a slow cycle is not followed by a burst of catch-up runs), the first one
immediately. SIGTERM/SIGINT set a flag the pipeline checks between messages: the message in hand
is finished, the rest wait for the next start, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from billing_responder.errors import BillingResponderError, ServiceUnavailableError
from billing_responder.pipeline import CycleReport, Outcome

log = logging.getLogger(__name__)

Cycle = Callable[..., CycleReport]


class Daemon:
    """Runs ``cycle`` every ``interval`` seconds until stopped or a fatal error."""

    def __init__(
        self,
        cycle: Cycle,
        interval: float,
        *,
        on_outcome: Callable[[Outcome], None] = lambda outcome: None,
    ) -> None:
        self._cycle = cycle
        self._interval = interval
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self.fatal: BillingResponderError | None = None

    def stop(self) -> None:
        """Ask the daemon to stop after the message in hand."""
        self._stop.set()

    def _job(self) -> None:
        if self._stop.is_set():
            return
        try:
            report = self._cycle(should_stop=self._stop.is_set, on_outcome=self._on_outcome)
        except ServiceUnavailableError as exc:
            # An outage is not a reason to die: the next interval tries again.
            log.error("cycle failed, will retry in %g s: %s", self._interval, exc)
            return
        except BillingResponderError as exc:
            self.fatal = exc
            self._stop.set()
            return
        if report.outcomes:
            log.info("cycle done: %s", report.summary())

    def run(self) -> None:
        """Block until SIGTERM/SIGINT or a fatal error; raises the fatal error if any."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_job(
            self._job,
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
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.fatal is not None:
            raise self.fatal
        log.info("stopped")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("%s received: finishing the message in hand", signal.Signals(signum).name)
        self._stop.set()
