"""Speed without losing exactly-once: idle polls, units per reply, concurrency, caps, paging.

Through the real clients against the emulators; the assertions are on what the emulators
recorded. No timings: the benchmark in ``benchmarks/`` measures speed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from billing_responder import gmail
from billing_responder.billing import StripeBilling
from billing_responder.config import load_config
from billing_responder.daemon import capped_reason
from billing_responder.gmail import GmailMailbox, load_credentials
from billing_responder.ledger import SqliteLedger
from billing_responder.model import MessageRef
from billing_responder.pipeline import Status
from billing_responder.sandbox._http import Fault, RecordedRequest
from billing_responder.sandbox.inbox import person_mail
from billing_responder.sandbox.stripe import DEFAULT_API_KEY
from billing_responder.service import Service, build_service
from tests.conftest import Sandbox
from tests.test_metrics import free_port, scrape, value

REPLIED = "billing-responder/replied"
NEEDS_HUMAN = "billing-responder/needs-human"


class RecordingGovernor:
    """A governor that waits for nothing and remembers what it was asked."""

    def __init__(self) -> None:
        self.taken: list[float] = []
        self.backed_off: list[float] = []

    def take(self, units: float) -> float:
        self.taken.append(units)
        return 0.0

    def back_off(self, seconds: float) -> None:
        self.backed_off.append(seconds)


@pytest.fixture
def service(sandbox: Sandbox) -> Iterator[Service]:
    built = build_service(load_config(sandbox.config_path), dry_run=False)
    yield built
    built.close()


def gmail_requests(sandbox: Sandbox, marker: str) -> list[RecordedRequest]:
    return [r for r in sandbox.gmail.requests if marker in r.path]


def message_gets(sandbox: Sandbox) -> list[RecordedRequest]:
    return [r for r in sandbox.gmail.requests
            if r.method == "GET" and "/messages/" in r.path and not r.path.endswith("/messages")]


def customers(sandbox: Sandbox, count: int, prefix: str = "customer") -> list[str]:
    addresses = [f"{prefix}{n}@example.com" for n in range(count)]
    for address in addresses:
        sandbox.stripe.add_customer(address)
    return addresses


class TestIdleAndUnits:
    def test_every_idle_cycle_of_the_daemon_is_one_request_of_two_units(
        self, sandbox: Sandbox, service: Service
    ) -> None:
        """Three idle cycles of one running service make three history.list requests and nothing else: 2 units each."""
        service.cycle()  # the first cycle searches; the rest poll the history
        sandbox.gmail.clear_requests()
        units = sandbox.gmail.units_used
        for _ in range(3):
            assert service.cycle().outcomes == []
        assert [r.path for r in sandbox.gmail.requests] == ["/gmail/v1/users/me/history"] * 3
        assert sandbox.gmail.units_used - units == 3 * 2

    def test_a_reply_found_through_the_history_costs_the_minimum_units(
        self, sandbox: Sandbox, service: Service
    ) -> None:
        """A new email answered by a polling cycle: one history.list, one metadata get, one send, one modify = 112 units."""
        sandbox.stripe.add_customer("ada@example.com")
        service.cycle()
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.clear_requests()
        units = sandbox.gmail.units_used

        report = service.cycle()

        assert [o.status for o in report.outcomes] == [Status.REPLIED]
        assert len(message_gets(sandbox)) == 1
        assert message_gets(sandbox)[0].param("format") == "metadata"
        assert sandbox.gmail.units_used - units == 2 + 5 + 100 + 5

    def test_label_ids_are_looked_up_once_not_per_message(
        self, sandbox: Sandbox, service: Service
    ) -> None:
        """Answering five emails lists the labels no more often than the start did: never per message."""
        for address in customers(sandbox, 5):
            sandbox.gmail.deliver(person_mail(address, "Invoice", "?"))
        sandbox.gmail.clear_requests()
        assert service.cycle().count(Status.REPLIED) == 5
        assert gmail_requests(sandbox, "/labels") == []
        assert gmail_requests(sandbox, "/threads/") == []


class TestConcurrency:
    def test_backlog_is_answered_by_several_workers_each_once(
        self, sandbox: Sandbox, service: Service, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Twelve emails from twelve customers: twelve replies, one per thread, written by more than one worker."""
        caplog.set_level(logging.INFO, logger="billing_responder.pipeline")
        threads = [sandbox.gmail.deliver(person_mail(a, "Invoice", "?"))[1]
                   for a in customers(sandbox, 12)]

        report = service.cycle()

        assert report.count(Status.REPLIED) == 12
        sent = sandbox.gmail.sent_messages()
        assert sorted(s.thread_id for s in sent) == sorted(threads)
        assert len(sandbox.stripe.portal_sessions()) == 12
        writers = {r.threadName for r in caplog.records if r.getMessage().startswith("replied to")}
        assert len(writers) > 1 and all(name.startswith("worker") for name in writers)

    def test_one_sender_writing_four_times_at_once_gets_one_reply(
        self, sandbox: Sandbox, service: Service
    ) -> None:
        """Four billing emails from one sender in four threads, handled by four workers: one reply, three rate-limited."""
        sandbox.stripe.add_customer("ada@example.com")
        for n in range(4):
            sandbox.gmail.deliver(person_mail("ada@example.com", f"Invoice {n}", "?"))

        report = service.cycle()

        assert len(sandbox.gmail.sent_messages()) == 1
        assert len(sandbox.stripe.portal_sessions()) == 1
        assert report.count(Status.REPLIED) == 1 and report.count(Status.SKIPPED) == 3
        skipped = [o for o in report.outcomes if o.status is Status.SKIPPED]
        assert all("this sender got an automatic reply" in o.decision.reasons[-1]
                   for o in skipped if o.decision)

    def test_two_emails_in_one_thread_at_once_get_one_reply(
        self, sandbox: Sandbox, service: Service
    ) -> None:
        """A customer's two emails in one thread, handled by different workers: one reply in that thread."""
        sandbox.stripe.add_customer("ada@example.com")
        original = person_mail("ada@example.com", "Invoice", "?")
        _, thread = sandbox.gmail.deliver(original)
        message_id = next(line.split(b": ", 1)[1].strip() for line in original.splitlines()
                          if line.lower().startswith(b"message-id:")).decode()
        follow_up = person_mail("ada@example.com", "Re: Invoice", "again?",
                                extra_headers={"In-Reply-To": message_id})
        _, second_thread = sandbox.gmail.deliver(follow_up)
        assert second_thread == thread

        report = service.cycle()

        [sent] = sandbox.gmail.sent_messages()
        assert sent.thread_id == thread
        assert report.count(Status.REPLIED) == 1 and report.count(Status.SKIPPED) == 1


class TestDailySendCap:
    def test_replies_stop_at_the_daily_cap_and_the_rest_go_to_a_person(
        self, sandbox: Sandbox
    ) -> None:
        """With max_sends_per_day = 3 and seven customers writing at once, exactly three replies go out; four are escalated, saying why."""
        sandbox.set_config("[limits]\nmax_sends_per_day = 3\nmax_replies_per_hour = 100")
        port = free_port()
        sandbox.set_config(f'[metrics]\nlisten = "127.0.0.1:{port}"')
        ids = [sandbox.gmail.deliver(person_mail(a, "Invoice", "?"))[0]
               for a in customers(sandbox, 7)]
        service = build_service(load_config(sandbox.config_path), dry_run=False)
        try:
            report = service.cycle()
            samples = scrape(port)
        finally:
            service.close()

        assert len(sandbox.gmail.sent_messages()) == 3
        assert len(sandbox.stripe.portal_sessions()) == 3
        escalated = [o for o in report.outcomes if o.status is Status.ESCALATED]
        assert len(escalated) == 4
        assert all(o.send_cap == "day" for o in escalated)
        assert all("daily send cap" in o.decision.reasons[-1] and "max_sends_per_day = 3"
                   in o.decision.reasons[-1] for o in escalated if o.decision)
        labels = [sandbox.gmail.message_label_names(i) for i in ids]
        assert sum(REPLIED in names for names in labels) == 3
        assert sum(NEEDS_HUMAN in names for names in labels) == 4
        reason = capped_reason(report)
        assert reason is not None and "daily send cap" in reason
        assert value(samples, "billing_responder_send_cap_reached", window="day") == 1
        assert value(samples, "billing_responder_send_cap_reached", window="hour") == 0

    def test_the_cap_counts_replies_of_earlier_runs(self, sandbox: Sandbox) -> None:
        """A cap reached yesterday-within-24h holds across a restart: the next run escalates without sending."""
        sandbox.set_config("[limits]\nmax_sends_per_day = 1")
        first, second = customers(sandbox, 2)
        sandbox.gmail.deliver(person_mail(first, "Invoice", "?"))
        assert "1 replied" in sandbox.cli("once").stdout
        sandbox.gmail.deliver(person_mail(second, "Invoice", "?"))

        result = sandbox.cli("once")

        assert "1 escalated" in result.stdout
        assert len(sandbox.gmail.sent_messages()) == 1
        ledger = SqliteLedger(sandbox.folder / "state.db", read_only=True)
        try:
            [row] = [e for e in ledger.entries() if e.sender == second]
        finally:
            ledger.close()
        assert any("daily send cap" in reason for reason in row.reasons)


class TestPaging:
    def test_the_search_is_read_a_page_at_a_time_as_the_workers_need_it(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With 5-id pages and 4 workers, page k+1 is asked for only once at least 5k-3 of the first replies went out."""
        monkeypatch.setattr(gmail, "_PAGE_SIZE", 5)
        for address in customers(sandbox, 20):
            sandbox.gmail.deliver(person_mail(address, "Invoice", "?"))
        service = build_service(load_config(sandbox.config_path), dry_run=False)
        try:
            assert service.cycle().count(Status.REPLIED) == 20
        finally:
            service.close()

        sends_before_page: list[int] = []
        sends = 0
        for request in sandbox.gmail.requests:
            if request.path.endswith("/messages/send"):
                sends += 1
            elif request.path.endswith("/messages") and "is:unread" in (request.param("q") or ""):
                sends_before_page.append(sends)
        assert len(sends_before_page) == 4
        for page, sent in enumerate(sends_before_page):
            assert sent >= 5 * page - 3


class TestGovernorsHearTheServers:
    def test_a_gmail_429_pauses_every_worker_for_its_retry_after(self, sandbox: Sandbox) -> None:
        """Gmail answers 429 with Retry-After: 1: the shared governor is told to pause 1 s, and every attempt paid its units."""
        config = load_config(sandbox.config_path)
        governor = RecordingGovernor()
        mailbox = GmailMailbox(config.gmail, load_credentials(config.gmail), governor=governor)
        message_id, thread_id = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(429, path="/messages/", headers={"Retry-After": "1"},
                                         reason="rateLimitExceeded"))
        try:
            fetched = mailbox.fetch(MessageRef(message_id, thread_id))
        finally:
            mailbox.close()
        assert fetched.id == message_id
        assert governor.backed_off == [1.0]
        assert governor.taken == [5, 5]

    def test_a_stripe_search_429_pauses_the_search_governor(self, sandbox: Sandbox) -> None:
        """Stripe's Search answers 429: the search governor pauses everyone; each search attempt took from both governors."""
        sandbox.stripe.add_customer("ada@example.com")
        general, search = RecordingGovernor(), RecordingGovernor()
        billing = StripeBilling(
            DEFAULT_API_KEY, api_base=sandbox.stripe.url, return_url="https://x.test",
            governor=general, search_governor=search,
        )
        sandbox.stripe.inject_fault(Fault(429, path="/customers/search",
                                          headers={"Retry-After": "1"}))
        try:
            found = billing.find_customers("ada@example.com")
        finally:
            billing.close()
        assert [c.email for c in found] == ["ada@example.com"]
        assert search.backed_off == [1.0] and general.backed_off == []
        assert len(search.taken) == 2  # the 429'd search and its retry
        assert len(general.taken) == 1 + 2  # the exact-match list, and both search attempts
