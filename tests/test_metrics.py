"""The Prometheus endpoint ([metrics] listen): its numbers agree with what the emulators recorded."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from billing_responder.config import load_config
from billing_responder.errors import StateError
from billing_responder.metrics import PrometheusMetrics
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import person_mail
from billing_responder.service import Service, build_service
from tests.conftest import Sandbox
from tests.test_cli import start_daemon, stop, wait_for
from tests.test_draft_mode import draft_mode

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PORTAL = "/v1/billing_portal/sessions"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int) -> Samples:
    """GET /metrics and parse it as Prometheus does: (sample name, labels) -> value."""
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError when the endpoint does not expose it."""
    return samples[(name, frozenset(labels.items()))]


def scrape_once_ready(port: int) -> Samples | None:
    """The samples once a cycle has succeeded; None before (or while the port is not open)."""
    try:
        samples = scrape(port)
    except requests.ConnectionError:
        return None
    return samples if value(samples, "billing_responder_last_success_timestamp_seconds") else None


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (its socket inodes matched in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
        except OSError:
            continue
        if match:
            inodes.add(match[1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


@pytest.fixture
def metrics_port(sandbox: Sandbox) -> int:
    """A free port, configured as the sandbox's [metrics] listen."""
    port = free_port()
    sandbox.set_config(f'[metrics]\nlisten = "127.0.0.1:{port}"')
    return port


@pytest.fixture
def service(sandbox: Sandbox, metrics_port: int) -> Iterator[Service]:
    """The responder built in-process from the sandbox config, endpoint serving; closed after."""
    built = build_service(load_config(sandbox.config_path), dry_run=False)
    try:
        yield built
    finally:
        built.close()


class TestDaemon:
    def test_counts_match_what_the_emulators_recorded(
        self, sandbox: Sandbox, metrics_port: int
    ) -> None:
        """`run` exposes replies, skips, escalations, a retried Stripe 500, Gmail quota units and latency exactly as the emulators saw them."""
        sandbox.set_config("[schedule]\ninterval_seconds = 3600")  # one cycle in this test
        for email in ("ada@example.com", "bob@example.org", "dan@example.com"):
            sandbox.stripe.add_customer(email)
        delivered = time.time()
        ms = int(delivered * 1000)
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice for March", "?"),
                              internal_date_ms=ms - 600_000)
        sandbox.gmail.deliver(person_mail("bob@example.org", "Billing question", "?"),
                              internal_date_ms=ms - 7_200_000)
        sandbox.gmail.deliver(person_mail("dan@example.com", "Invoice paid", "receipt",
                                          extra_headers={"Auto-Submitted": "auto-generated"}))
        carol, _ = sandbox.gmail.deliver(person_mail("carol@example.net", "Invoice?", "?"))
        sandbox.stripe.inject_fault(Fault(500, method="POST", path=PORTAL, times=1))
        started = time.time()
        process = start_daemon(sandbox)
        try:
            assert wait_for(lambda: scrape_once_ready(metrics_port)), "no successful cycle"
            samples = scrape(metrics_port)
            ended = time.time()
            assert listening_ports(process.pid) == {metrics_port}
        finally:
            code, _, _, err = stop(process)
        assert code == 0, err

        sent = sandbox.gmail.sent_messages()
        assert len(sent) == 2
        assert value(samples, "billing_responder_replies_total") == len(sent)
        assert value(samples, "billing_responder_messages_total", decision="replied") == 2
        assert value(samples, "billing_responder_messages_total", decision="skipped") == 1
        assert value(samples, "billing_responder_messages_total", decision="escalated") == 1
        assert "billing-responder/needs-human" in sandbox.gmail.message_label_names(carol)
        assert value(samples, "billing_responder_escalations_total") == 1

        portal_calls = [r for r in sandbox.stripe.requests if r.path == PORTAL]
        assert len(portal_calls) == 3  # two sessions, one of them on the second attempt
        assert value(samples, "billing_responder_retries_total", service="stripe") == 1
        assert value(samples, "billing_responder_retries_total", service="gmail") == 0
        for service in ("gmail", "stripe", "ledger", "internal"):
            assert value(samples, "billing_responder_errors_total", service=service) == 0

        assert value(samples, "billing_responder_gmail_quota_units_total") == (
            sandbox.gmail.units_used
        )
        assert value(samples, "billing_responder_cycle_duration_seconds_count") == 1
        assert started <= value(samples, "billing_responder_last_success_timestamp_seconds") <= ended

        # Received 10 minutes and 2 hours before delivery, answered within this run.
        latency = "billing_responder_reply_latency_seconds"
        assert value(samples, f"{latency}_count") == 2
        assert 7800 < value(samples, f"{latency}_sum") <= 7800 + 2 * (ended - delivered) + 1
        assert value(samples, f"{latency}_bucket", le="300.0") == 0
        assert value(samples, f"{latency}_bucket", le="1800.0") == 1
        assert value(samples, f"{latency}_bucket", le="21600.0") == 2

    def test_port_in_use_exits_2_naming_metrics_listen_before_calling_any_service(
        self, sandbox: Sandbox, metrics_port: int
    ) -> None:
        """`run` with [metrics] listen on a port already taken exits 2 with one line naming metrics.listen, having called neither Gmail nor Stripe."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", metrics_port))
            taken.listen()
            process = start_daemon(sandbox)
            try:
                _, err = process.communicate(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
        assert process.returncode == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "metrics.listen" in lines[0] and "in use" in lines[0]
        assert sandbox.gmail.requests == [] and sandbox.stripe.requests == []

    def test_no_endpoint_without_metrics_listen(self, sandbox: Sandbox) -> None:
        """Without [metrics] listen, `run` answers mail but listens on no TCP port at all."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        process = start_daemon(sandbox)
        try:
            assert wait_for(sandbox.gmail.sent_messages)
            ports = listening_ports(process.pid)
        finally:
            code, _, _, err = stop(process)
        assert code == 0, err
        assert ports == set()

    def test_once_beside_a_serving_daemon_answers_without_touching_the_port(
        self, sandbox: Sandbox, metrics_port: int
    ) -> None:
        """`once` with [metrics] listen set to a port already taken (the daemon's) still answers mail and exits 0, saying nothing about metrics."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        with socket.socket() as daemons:
            daemons.bind(("127.0.0.1", metrics_port))
            daemons.listen()
            result = sandbox.cli("once")
        assert result.code == 0, result.stderr
        assert "metrics" not in result.stderr
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_a_draft_counts_as_a_reply_with_its_latency(
        self, sandbox: Sandbox, metrics_port: int
    ) -> None:
        """In draft mode, `run` counts the draft it made in replies_total, messages{drafted} and the latency histogram."""
        sandbox.set_config("[schedule]\ninterval_seconds = 3600")
        draft_mode(sandbox)
        sandbox.stripe.add_customer("ada@example.com")
        ms = int(time.time() * 1000)
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"),
                              internal_date_ms=ms - 600_000)
        process = start_daemon(sandbox)
        try:
            assert wait_for(lambda: scrape_once_ready(metrics_port)), "no successful cycle"
            samples = scrape(metrics_port)
        finally:
            code, _, _, err = stop(process)
        assert code == 0, err
        assert sandbox.gmail.sent_messages() == [] and len(sandbox.gmail.drafts()) == 1
        assert value(samples, "billing_responder_messages_total", decision="drafted") == 1
        assert value(samples, "billing_responder_replies_total") == 1
        assert value(samples, "billing_responder_reply_latency_seconds_count") == 1
        assert value(samples, "billing_responder_reply_latency_seconds_bucket", le="300.0") == 0


class TestInProcess:
    def test_every_gmail_attempt_is_counted_retries_included(
        self, sandbox: Sandbox, metrics_port: int, service: Service, fast_retries: None
    ) -> None:
        """Quota units count each Gmail request made, a failed attempt too, over full and incremental cycles; the emulator charges only answered ones."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.stripe.add_customer("bob@example.org")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(503, method="GET", path=r"/messages/[^/]+$", times=1))
        service.cycle()
        sandbox.gmail.deliver(person_mail("bob@example.org", "Invoice", "?"))
        service.cycle()  # incremental: users.history.list
        samples = scrape(metrics_port)
        assert any(r.path.endswith("/history") for r in sandbox.gmail.requests)
        assert len(sandbox.gmail.sent_messages()) == 2
        assert value(samples, "billing_responder_retries_total", service="gmail") == 1
        assert value(samples, "billing_responder_gmail_quota_units_total") == (
            sandbox.gmail.units_used + 5  # the messages.get answered 503
        )

    def test_a_deferred_message_counts_an_error_against_its_service(
        self, sandbox: Sandbox, metrics_port: int, service: Service
    ) -> None:
        """A Stripe 400 on minting defers the message: errors{service="stripe"} is 1 and the cycle still counts as a success."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(Fault(400, method="POST", path=PORTAL, times=1))
        before = time.time()
        service.cycle()
        samples = scrape(metrics_port)
        assert sandbox.gmail.sent_messages() == []
        assert value(samples, "billing_responder_messages_total", decision="deferred") == 1
        assert value(samples, "billing_responder_errors_total", service="stripe") == 1
        assert value(samples, "billing_responder_errors_total", service="gmail") == 0
        assert value(samples, "billing_responder_retries_total", service="stripe") == 0
        assert value(samples, "billing_responder_last_success_timestamp_seconds") >= before

    def test_an_outage_that_stops_a_cycle_counts_an_error_and_moves_no_last_success(
        self, sandbox: Sandbox, metrics_port: int, service: Service, fast_retries: None
    ) -> None:
        """Gmail failing the listing through every retry counts errors{gmail} once and 3 retries; last success moves only with the next, working cycle."""
        sandbox.gmail.inject_fault(Fault(503, method="GET", path=r"/messages$", times=4))
        with pytest.raises(Exception, match="Gmail"):
            service.cycle()
        samples = scrape(metrics_port)
        assert value(samples, "billing_responder_errors_total", service="gmail") == 1
        assert value(samples, "billing_responder_retries_total", service="gmail") == 3
        assert value(samples, "billing_responder_cycle_duration_seconds_count") == 1
        assert value(samples, "billing_responder_last_success_timestamp_seconds") == 0
        before = time.time()
        service.cycle()
        samples = scrape(metrics_port)
        assert value(samples, "billing_responder_cycle_duration_seconds_count") == 2
        assert value(samples, "billing_responder_last_success_timestamp_seconds") >= before

    def test_close_releases_the_port_and_stops_the_server_thread(
        self, sandbox: Sandbox, metrics_port: int
    ) -> None:
        """After Service.close nothing answers on the port, no serving thread is left, and a restarted responder serves there again."""
        for _ in range(2):  # the second start is the restart that finds the port free
            built = build_service(load_config(sandbox.config_path), dry_run=False)
            try:
                assert ("billing_responder_replies_total", frozenset()) in scrape(metrics_port)
            finally:
                built.close()
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            assert not [t for t in threading.enumerate() if "serve_forever" in t.name]

    def test_a_close_that_fails_still_releases_the_rest(
        self, sandbox: Sandbox, metrics_port: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If closing the Gmail client raises, Service.close still closes the ledger and frees the metrics port, then raises that error."""
        built = build_service(load_config(sandbox.config_path), dry_run=False)

        def broken() -> None:
            raise RuntimeError("close failed")

        real_close = built.mailbox.close
        monkeypatch.setattr(built.mailbox, "close", broken)
        try:
            with pytest.raises(RuntimeError, match="close failed"):
                built.close()
            with pytest.raises(requests.ConnectionError):
                requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            with pytest.raises(StateError, match="closed database"):
                built.ledger.history()
        finally:
            real_close()


class TestRegistry:
    def test_each_metrics_object_counts_in_its_own_registry(self) -> None:
        """Two PrometheusMetrics never share counts, and nothing lands in prometheus-client's global registry."""
        first, second = PrometheusMetrics(), PrometheusMetrics()
        try:
            first.gmail_quota(100)
            name = "billing_responder_gmail_quota_units_total"
            assert first.registry.get_sample_value(name) == 100
            assert second.registry.get_sample_value(name) == 0
            assert REGISTRY.get_sample_value(name) is None
        finally:
            first.close()
            second.close()
