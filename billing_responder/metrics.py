"""The optional Prometheus endpoint (``[metrics] listen``): what the responder did, for alerting.

Served at ``http://<listen>/metrics`` by prometheus-client's small HTTP server, from a registry
of our own (never the library's global one, so two responders in one process, as in tests, never
share counts). Counters start at zero with the process:

    billing_responder_messages_total{decision}       every message looked at, by what became of
                                                      it: replied, skipped, escalated, deferred,
                                                      waiting, already_handled, would_reply...
    billing_responder_replies_total                   replies sent (or left as drafts in draft mode)
    billing_responder_escalations_total               messages labelled needs-human
    billing_responder_errors_total{service}           a message deferred by that service's error,
                                                      or a cycle stopped by it (gmail, stripe,
                                                      ledger; internal: a bug)
    billing_responder_retries_total{service}          calls repeated after a failure (gmail, stripe)
    billing_responder_gmail_quota_units_total         Gmail quota units of the calls made, every
                                                      attempt counted
    billing_responder_cycle_duration_seconds          histogram: one poll cycle, start to end
    billing_responder_reply_latency_seconds           histogram: from Gmail receiving a message to
                                                      the reply going out (or the draft made)
    billing_responder_last_success_timestamp_seconds  when the last cycle ended without error
                                                      (0: none yet)
    billing_responder_send_cap_reached{window}        1 when the last cycle sent billing mail to
                                                      a person because of a ceiling on replies:
                                                      window="hour" (max_replies_per_hour) or
                                                      "day" (max_sends_per_day); else 0
    process_*                                         CPU, memory, open files, start time;
                                                      absent under the shipped unit, whose
                                                      ProcSubset=pid hides the /proc/stat they
                                                      need (node_exporter covers the host)

Without ``listen`` the responder gets the base :class:`Metrics`, which records nothing, so no
caller ever asks whether metrics are on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from billing_responder.config import Config, parse_listen
from billing_responder.errors import ConfigError
from billing_responder.pipeline import ANSWERED, Outcome, Status
from billing_responder.retry import observe_retries

log = logging.getLogger(__name__)

#: A cycle is one call when nothing happened, minutes when a backlog or back-off is handled.
CYCLE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: From seconds (the daemon was polling) to a day (it was down, or the mail was deferred).
LATENCY_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0,
    86400.0,
)  # fmt: skip
#: The ``service`` label's values, from the names errors and retry policies carry.
_SERVICES = {"gmail": "gmail", "stripe": "stripe", "ledger": "ledger", "state database": "ledger"}
INTERNAL = "internal"


def service_label(name: str) -> str:
    """The ``service`` label for a service as errors name it ("Gmail", "state database"...)."""
    return _SERVICES.get(name.lower(), INTERNAL)


def decision_label(status: Status) -> str:
    """The ``decision`` label for an outcome: ``replied``, ``would_reply``, ``waiting``..."""
    return status.name.lower()


class Metrics:
    """What the responder reports about its work. This base records nothing (no endpoint)."""

    def outcome(self, outcome: Outcome) -> None:
        """One message's outcome."""

    def cycle_finished(self, seconds: float, *, succeeded: bool) -> None:
        """A cycle took ``seconds``; ``succeeded``: it ended without an error."""

    def send_caps(self, windows: frozenset[str]) -> None:
        """The ceilings on replies the last cycle met: "hour", "day", or none."""

    def fatal_error(self, service: str) -> None:
        """A cycle was stopped by ``service``'s error (a FatalServiceError's ``service``)."""

    def retried(self, service: str) -> None:
        """A call to ``service`` ("Gmail", "Stripe") is being made again after a failure."""

    def gmail_quota(self, units: int) -> None:
        """A Gmail request costing ``units`` quota units is being made."""

    def close(self) -> None:
        """Stop serving; nothing is reported afterwards."""


class PrometheusMetrics(Metrics):
    """Metrics in a registry of their own, served over HTTP once :meth:`serve` is called."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.registry = CollectorRegistry()
        registry = self.registry
        self._messages = Counter(
            "billing_responder_messages",
            "Messages looked at, by what became of them.",
            ["decision"],
            registry=registry,
        )
        self._replies = Counter(
            "billing_responder_replies",
            "Replies sent, or drafted in draft mode.",
            registry=registry,
        )
        self._escalations = Counter(
            "billing_responder_escalations",
            "Messages labelled for a person (needs-human).",
            registry=registry,
        )
        self._errors = Counter(
            "billing_responder_errors",
            "Messages deferred by a service's error, and cycles stopped by one.",
            ["service"],
            registry=registry,
        )
        self._retries = Counter(
            "billing_responder_retries",
            "Calls made again after a failed attempt.",
            ["service"],
            registry=registry,
        )
        self._quota = Counter(
            "billing_responder_gmail_quota_units",
            "Gmail API quota units of the requests made, every attempt counted.",
            registry=registry,
        )
        self._cycle = Histogram(
            "billing_responder_cycle_duration_seconds",
            "How long one poll cycle took.",
            buckets=CYCLE_BUCKETS,
            registry=registry,
        )
        self._latency = Histogram(
            "billing_responder_reply_latency_seconds",
            "From Gmail receiving a message to the reply being sent.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._last_success = Gauge(
            "billing_responder_last_success_timestamp_seconds",
            "When the last cycle ended without an error (Unix time; 0: none yet).",
            registry=registry,
        )
        self._send_cap = Gauge(
            "billing_responder_send_cap_reached",
            "1 when the last cycle sent billing mail to a person because of a ceiling on replies"
            " (the hourly breaker, or the daily send cap).",
            ["window"],
            registry=registry,
        )
        for window in ("hour", "day"):
            self._send_cap.labels(window=window).set(0)
        ProcessCollector(registry=registry)
        # Every label value exists from the start at 0, so a rate() over a fresh process and an
        # alert on "any errors" see the series before the first increment.
        for status in Status:
            self._messages.labels(decision=decision_label(status))
        for service in dict.fromkeys(_SERVICES.values()):
            self._errors.labels(service=service)
        self._errors.labels(service=INTERNAL)
        for service in ("gmail", "stripe"):
            self._retries.labels(service=service)
        self._forget_retries = observe_retries(self.retried)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on ``host:port`` in a background thread; OSError if it cannot."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    def outcome(self, outcome: Outcome) -> None:
        """Count the outcome; a reply's arrival-to-reply time goes into the latency histogram."""
        self._messages.labels(decision=decision_label(outcome.status)).inc()
        if outcome.status in ANSWERED:
            self._replies.inc()
            if outcome.received_ms:
                self._latency.observe(max(0.0, self._clock() - outcome.received_ms / 1000))
        elif outcome.status is Status.ESCALATED:
            self._escalations.inc()
        elif outcome.status is Status.DEFERRED and outcome.error:
            # A deferral's error reads "<service>: <what happened>" (TransientServiceError);
            # "internal error: ..." is a bug met by one message.
            self._errors.labels(service=service_label(outcome.error.partition(": ")[0])).inc()

    def cycle_finished(self, seconds: float, *, succeeded: bool) -> None:
        """Time the cycle; a successful one moves the last-success timestamp."""
        self._cycle.observe(seconds)
        if succeeded:
            self._last_success.set(self._clock())

    def send_caps(self, windows: frozenset[str]) -> None:
        """The ceilings on replies the last cycle met ("hour", "day"; none: all clear)."""
        for window in ("hour", "day"):
            self._send_cap.labels(window=window).set(1 if window in windows else 0)

    def fatal_error(self, service: str) -> None:
        """Count the error that stopped a cycle against its service."""
        self._errors.labels(service=service_label(service)).inc()

    def retried(self, service: str) -> None:
        """Count one retry of ``service``."""
        self._retries.labels(service=service_label(service)).inc()

    def gmail_quota(self, units: int) -> None:
        """Add the units of one Gmail request."""
        self._quota.inc(units)

    def close(self) -> None:
        """Stop observing retries, stop serving and release the port (idempotent)."""
        self._forget_retries()
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()  # shutdown() alone leaves the port bound
        if thread is not None:
            thread.join()


def start_metrics(config: Config) -> Metrics:
    """The endpoint ``[metrics] listen`` asks for, serving; a :class:`Metrics` doing nothing
    when it is empty. A port in use or an address that is not ours is a config error."""
    listen = config.metrics.listen
    if not listen:
        return Metrics()
    shown = str(config.path)
    host, port = parse_listen(listen, "metrics.listen", shown)
    metrics = PrometheusMetrics()
    try:
        metrics.serve(host, port)
    except OSError as exc:
        metrics.close()
        problem = f"cannot serve metrics on {listen}: {exc.strerror or exc}"
        raise ConfigError(shown, "metrics.listen", problem) from None
    log.info("serving metrics at http://%s/metrics", listen)
    return metrics
