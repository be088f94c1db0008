"""Limits on automatic answering: age, per thread, per sender, the hourly circuit breaker, and
giving up on a message that keeps failing. Pure rules first, then end to end over HTTP."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid

import pytest

from billing_responder.ledger import SqliteLedger
from billing_responder.limits import Limits, next_attempt, reply_blocked, too_old
from billing_responder.mail import new_message_id
from billing_responder.model import DONE, Action
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import MAILBOX, person_mail
from tests.conftest import Sandbox
from tests.test_responder import NEEDS_HUMAN, REPLIED, _time_passes

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class History:
    """An in-memory ReplyHistory: replies as (sender, thread, when)."""

    def __init__(self, *replies: tuple[str, str, datetime]) -> None:
        self.replies = list(replies)

    def last_reply_to(self, sender: str) -> datetime | None:
        times = [w for s, _, w in self.replies if s.lower() == sender.lower()]
        return max(times) if times else None

    def replied_in_thread(self, thread_id: str) -> bool:
        return any(t == thread_id for _, t, _ in self.replies)

    def replies_since(self, since: datetime) -> int:
        return sum(1 for _, _, w in self.replies if w >= since)


class TestRules:
    def test_message_older_than_max_age_is_too_old(self) -> None:
        """A message received more than max_age_days ago gets a reason; a newer one none."""
        limits = Limits(max_age_days=7)
        assert too_old(NOW - timedelta(days=6, hours=23), NOW, limits) is None
        reason = too_old(NOW - timedelta(days=30), NOW, limits)
        assert reason is not None and "30 days ago" in reason and "max_age_days" in reason

    def test_thread_already_answered_is_skipped(self) -> None:
        """One automatic reply per thread, ever, whoever writes next."""
        history = History(("a@x.test", "t1", NOW - timedelta(days=300)))
        blocked = reply_blocked(history, "b@y.test", "t1", NOW, Limits())
        assert blocked is not None and blocked[0] is Action.SKIP and "thread" in blocked[1]

    def test_sender_answered_within_the_period_is_skipped_regardless_of_case(self) -> None:
        """A sender answered 23 h ago gets nothing now; 25 h ago, a reply is allowed."""
        limits = Limits(per_sender_hours=24)
        recent = History(("Ada@X.test", "t1", NOW - timedelta(hours=23)))
        blocked = reply_blocked(recent, "ada@x.TEST", "t2", NOW, limits)
        assert blocked is not None and blocked[0] is Action.SKIP and "per_sender_hours" in blocked[1]
        older = History(("ada@x.test", "t1", NOW - timedelta(hours=25)))
        assert reply_blocked(older, "ada@x.test", "t2", NOW, limits) is None

    def test_breaker_escalates_at_the_hourly_ceiling(self) -> None:
        """With max_replies_per_hour replies in the last hour, the next is escalated, not sent."""
        limits = Limits(max_replies_per_hour=3)
        replies = [(f"s{i}@x.test", f"t{i}", NOW - timedelta(minutes=10 * i)) for i in range(3)]
        blocked = reply_blocked(History(*replies), "new@x.test", "tn", NOW, limits)
        assert blocked is not None and blocked[0] is Action.ESCALATE and "circuit breaker" in blocked[1]
        assert reply_blocked(History(*replies[:2]), "new@x.test", "tn", NOW, limits) is None

    def test_breaker_window_slides(self) -> None:
        """Replies older than an hour no longer count towards the ceiling."""
        limits = Limits(max_replies_per_hour=2)
        replies = [("a@x.test", "t1", NOW - timedelta(minutes=61)),
                   ("b@x.test", "t2", NOW - timedelta(minutes=5))]
        assert reply_blocked(History(*replies), "c@x.test", "t3", NOW, limits) is None

    def test_retry_waits_double_and_are_capped_at_an_hour(self) -> None:
        """After n failures the next attempt waits 30 s * 2**(n-1), never more than an hour."""
        assert next_attempt(NOW, 1) == NOW + timedelta(seconds=30)
        assert next_attempt(NOW, 3) == NOW + timedelta(seconds=120)
        assert next_attempt(NOW, 12) == NOW + timedelta(hours=1)


def _ledger(sandbox: Sandbox) -> SqliteLedger:
    return SqliteLedger(sandbox.folder / "state.db")


class TestEndToEnd:
    def test_three_billing_emails_from_one_sender_get_one_reply(self, sandbox: Sandbox) -> None:
        """Within per_sender_hours one sender gets one reply; the others are recorded as rate-limited."""
        sandbox.stripe.add_customer("ada@example.com")
        ids = [sandbox.gmail.deliver(person_mail("ada@example.com", f"Invoice {n}", "?"))[0]
               for n in range(3)]
        first = sandbox.cli("once")
        assert first.code == 0
        assert len(sandbox.gmail.sent_messages()) == 1
        assert "1 replied, 2 skipped" in first.stdout
        ledger = _ledger(sandbox)
        reasons = [ledger.get(i).reasons for i in ids]  # type: ignore[union-attr]
        assert sum(any("rate-limited" in r for r in rs) for rs in reasons) == 2
        # A restart does not reset the limit.
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice 4", "?"))
        assert sandbox.cli("once").code == 0
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_sender_is_answered_again_after_the_period(self, sandbox: Sandbox) -> None:
        """Once per_sender_hours have passed, the same sender's new billing email is answered."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice 1", "?"))
        sandbox.cli("once")
        _time_passes(sandbox, 25 * 3600)
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice 2", "?"))
        sandbox.cli("once")
        assert len(sandbox.gmail.sent_messages()) == 2

    def test_second_message_in_an_answered_thread_gets_no_reply(self, sandbox: Sandbox) -> None:
        """Another person writing in a thread we already answered is not answered again."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.stripe.add_customer("bob@example.org")
        original = person_mail("ada@example.com", "Invoice", "?")
        _, thread_id = sandbox.gmail.deliver(original)
        sandbox.cli("once")
        parent = sandbox.gmail.message(sandbox.gmail.sent_messages()[0].id).message["In-Reply-To"]
        follow_up = EmailMessage()
        follow_up.set_content("me too")
        for key, value in (("From", "bob@example.org"), ("To", MAILBOX), ("Subject", "Re: Invoice"),
                           ("Message-ID", make_msgid(domain="example.org")),
                           ("In-Reply-To", parent), ("References", parent),
                           ("Authentication-Results", "mx.google.com; dmarc=pass header.from=example.org")):
            follow_up[key] = value
        follow_id, follow_thread = sandbox.gmail.deliver(bytes(follow_up))
        assert follow_thread == thread_id
        result = sandbox.cli("once")
        assert result.code == 0
        assert len(sandbox.gmail.sent_messages()) == 1
        entry = _ledger(sandbox).get(follow_id)
        assert entry is not None and any("thread already got" in r for r in entry.reasons)

    def test_circuit_breaker_escalates_and_stays_tripped_across_restarts(
        self, sandbox: Sandbox
    ) -> None:
        """At max_replies_per_hour, further billing mail is escalated, also after a restart, until the hour passes."""
        sandbox.set_config("[limits]\nmax_replies_per_hour = 2")
        senders = [f"c{n}@example.com" for n in range(5)]
        for sender in senders:
            sandbox.stripe.add_customer(sender)
        for sender in senders[:3]:
            sandbox.gmail.deliver(person_mail(sender, "Invoice", "?"))
        first = sandbox.cli("once")
        assert "2 replied, 1 escalated" in first.stdout
        assert "circuit breaker" in first.stdout
        _, thread = sandbox.gmail.deliver(person_mail(senders[3], "Invoice", "?"))
        assert "1 escalated" in sandbox.cli("once").stdout
        assert NEEDS_HUMAN in sandbox.gmail.thread_label_names(thread)
        assert len(sandbox.gmail.sent_messages()) == 2
        _time_passes(sandbox, 3601)
        sandbox.gmail.deliver(person_mail(senders[4], "Invoice", "?"))
        assert "1 replied" in sandbox.cli("once").stdout
        assert len(sandbox.gmail.sent_messages()) == 3

    def test_old_unread_mail_is_recorded_as_skipped_not_answered(self, sandbox: Sandbox) -> None:
        """A billing email older than max_age_days is skipped with the reason, no link, no label."""
        sandbox.stripe.add_customer("ada@example.com")
        received = int((time.time() - 30 * 86400) * 1000)
        message_id, thread = sandbox.gmail.deliver(
            person_mail("ada@example.com", "Invoice", "?"), internal_date_ms=received)
        result = sandbox.cli("once")
        assert result.code == 0 and "1 skipped" in result.stdout
        assert sandbox.gmail.sent_messages() == [] and sandbox.stripe.portal_sessions() == []
        assert not {REPLIED, NEEDS_HUMAN} & sandbox.gmail.thread_label_names(thread)
        entry = _ledger(sandbox).get(message_id)
        assert entry is not None and entry.state == DONE
        assert any("too old" in r for r in entry.reasons)

    def test_max_age_days_is_configurable(self, sandbox: Sandbox) -> None:
        """[triage] max_age_days = 60 lets a 30-day-old billing email be answered."""
        sandbox.set_config("[triage]\nmax_age_days = 60")
        sandbox.stripe.add_customer("ada@example.com")
        received = int((time.time() - 30 * 86400) * 1000)
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"),
                              internal_date_ms=received)
        sandbox.cli("once")
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_deferred_message_waits_before_its_next_attempt(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """Right after a failure the next cycle leaves the message alone: no fetch, no output line."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(Fault(503, path="/v1/billing_portal/sessions", times=100))
        assert "1 deferred" in sandbox.cli("once").stdout
        sandbox.gmail.clear_requests()
        second = sandbox.cli("once")
        assert message_id not in second.stdout.replace("1 message", "")
        assert not [r for r in sandbox.gmail.requests if r.path.endswith(f"/messages/{message_id}")]

    def test_message_failing_max_attempts_times_is_escalated_with_the_reason(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """After [limits] max_attempts failures the message gets needs-human and the last error; no reply."""
        sandbox.set_config("[limits]\nmax_attempts = 3")
        sandbox.stripe.add_customer("ada@example.com")
        message_id, thread = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(Fault(503, path="/v1/billing_portal/sessions", times=1000))
        outputs = []
        for _ in range(3):
            outputs.append(sandbox.cli("once").stdout)
            _time_passes(sandbox, 3600)
        assert "1 deferred" in outputs[0] and "1 deferred" in outputs[1]
        assert "1 escalated" in outputs[2]
        assert NEEDS_HUMAN in sandbox.gmail.thread_label_names(thread)
        assert sandbox.gmail.sent_messages() == []
        entry = _ledger(sandbox).get(message_id)
        assert entry is not None and entry.state == DONE and entry.action == "escalate"
        assert any("gave up after 3 failed attempts" in r and "503" in r for r in entry.reasons)
        # Escalated means done: a fourth run neither retries nor reports it.
        sandbox.stripe.clear_requests()
        sandbox.cli("once")
        assert not [r for r in sandbox.stripe.requests if r.path == "/v1/billing_portal/sessions"]


class TestLoopProtection:
    def test_mail_from_a_send_as_alias_is_never_answered(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Mail from one of the mailbox's "Send mail as" aliases is skipped as our own."""
        monkeypatch.setattr(sandbox.gmail, "send_as_aliases", ["billing@acme-saas.test"])
        sandbox.stripe.add_customer("billing@acme-saas.test")
        message_id, _ = sandbox.gmail.deliver(person_mail("billing@acme-saas.test", "Invoice", "?"))
        result = sandbox.cli("once")
        assert result.code == 0
        assert sandbox.gmail.sent_messages() == []
        entry = _ledger(sandbox).get(message_id)
        assert entry is not None
        assert any("own mailbox billing@acme-saas.test" in r for r in entry.reasons)

    def test_our_own_reply_coming_back_is_never_answered(self, sandbox: Sandbox) -> None:
        """A message carrying one of our reply Message-IDs (a copy come back) is skipped."""
        sandbox.stripe.add_customer("ada@example.com")
        raw = person_mail("ada@example.com", "Re: Invoice", "copy")
        own_id = new_message_id("acme-saas.test").encode()
        head, _, body = raw.partition(b"\n\n")
        lines = [line for line in head.split(b"\n") if not line.lower().startswith(b"message-id:")]
        message_id, _ = sandbox.gmail.deliver(
            b"\n".join([*lines, b"Message-ID: " + own_id]) + b"\n\n" + body)
        assert sandbox.cli("once").code == 0
        assert sandbox.gmail.sent_messages() == []
        entry = _ledger(sandbox).get(message_id)
        assert entry is not None and any("our own automatic replies" in r for r in entry.reasons)


class TestInDoubtSends:
    def test_lost_send_answer_holds_back_other_mail_from_that_sender(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """While a reply to Ada may have gone out unseen, her next email waits; in the end she gets one reply."""
        sandbox.stripe.add_customer("ada@example.com")
        first, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice 1", "?"))
        sandbox.gmail.inject_fault(Fault(503, method="POST", path="/messages/send", after=True))
        assert "1 deferred" in sandbox.cli("once").stdout
        second, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice 2", "?"))

        held = sandbox.cli("once")

        assert held.code == 0
        assert len(sandbox.gmail.sent_messages()) == 1
        entry = _ledger(sandbox).get(second)
        assert entry is not None and "not resolved yet" in (entry.last_error or "")
        _time_passes(sandbox, 3600)
        sandbox.cli("once")
        assert len(sandbox.gmail.sent_messages()) == 1
        assert REPLIED in sandbox.gmail.message_label_names(first)
        resolved = _ledger(sandbox).get(second)
        assert resolved is not None and any("rate-limited" in r for r in resolved.reasons)
