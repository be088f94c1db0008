"""End to end: incremental sync through users.history.list, and its fallbacks to a full search.

Every run is `billing-responder once` through the real Gmail client against the emulator; the
assertions are about what the emulator recorded (requests, quota units, replies, labels) and what
the ledger stored.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

import pytest

from billing_responder.errors import StateError
from billing_responder.ledger import SqliteLedger
from billing_responder.sandbox._http import Fault, RecordedRequest
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import Sandbox

REPLIED = "billing-responder/replied"
PROFILE = "/gmail/v1/users/me/profile"


def stored_history_id(sandbox: Sandbox) -> int | None:
    ledger = SqliteLedger(sandbox.folder / "state.db", read_only=True)
    try:
        return ledger.history_id()
    finally:
        ledger.close()


def calls(sandbox: Sandbox, suffix: str, method: str = "GET") -> list[RecordedRequest]:
    return [r for r in sandbox.gmail.requests if r.method == method and r.path.endswith(suffix)]


def listings(sandbox: Sandbox) -> list[RecordedRequest]:
    """The candidate searches (not the rfc822msgid: look-ups for an interrupted reply)."""
    return [r for r in calls(sandbox, "/messages") if "is:unread" in (r.param("q") or "")]


def gets(sandbox: Sandbox) -> list[RecordedRequest]:
    return [r for r in sandbox.gmail.requests
            if r.method == "GET" and "/messages/" in r.path and not r.path.endswith("/messages")]


def history_calls(sandbox: Sandbox) -> list[RecordedRequest]:
    return calls(sandbox, "/history")


def time_passes(sandbox: Sandbox, seconds: float) -> None:
    """Move the ledger's message timestamps back, as if ``seconds`` had passed."""
    db = sqlite3.connect(sandbox.folder / "state.db")
    shift = timedelta(seconds=seconds)
    with db:
        for gmail_id, updated in db.execute("SELECT gmail_id, updated_at FROM messages").fetchall():
            earlier = (datetime.fromisoformat(updated) - shift).isoformat(timespec="seconds")
            db.execute("UPDATE messages SET updated_at = ? WHERE gmail_id = ?", (earlier, gmail_id))
    db.close()


class TestFirstRun:
    def test_first_run_searches_and_stores_the_history_id_read_before_the_listing(
        self, sandbox: Sandbox
    ) -> None:
        """With no stored history id, the run lists by search and stores the id read before it."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        before = sandbox.gmail.history_id

        result = sandbox.cli("once")

        assert result.code == 0 and "1 replied" in result.stdout
        assert len(listings(sandbox)) == 1 and history_calls(sandbox) == []
        paths = [r.path for r in sandbox.gmail.requests]
        last_profile = max(i for i, p in enumerate(paths) if p == PROFILE)
        assert last_profile < paths.index(listings(sandbox)[0].path)
        # The reply and its label moved the mailbox on; the stored id is from before them.
        assert sandbox.gmail.history_id > before
        assert stored_history_id(sandbox) == before


class TestIdleCycle:
    def test_idle_cycle_is_one_history_call_of_two_units(self, sandbox: Sandbox) -> None:
        """After a run that replied, an idle `once` polls with one history.list: 2 units, no list or get."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        assert "1 replied" in sandbox.cli("once").stdout
        sandbox.gmail.clear_requests()
        units_before = sandbox.gmail.units_used

        result = sandbox.cli("once")

        assert result.code == 0 and "0 messages" in result.stdout
        [history] = history_calls(sandbox)
        assert listings(sandbox) == [] and gets(sandbox) == [] and sandbox.gmail.writes() == []
        # Start-up checks the profile, the send-as aliases and the labels (1 unit each); polling
        # is the rest.
        startup = [r.path for r in sandbox.gmail.requests if r is not history]
        assert sorted(startup) == sorted(
            [PROFILE, "/gmail/v1/users/me/settings/sendAs", "/gmail/v1/users/me/labels"])
        assert sandbox.gmail.units_used - units_before - 3 == 2
        assert set(history.query["historyTypes"]) == {"messageAdded", "labelAdded", "labelRemoved"}
        assert stored_history_id(sandbox) == sandbox.gmail.history_id


class TestThroughHistory:
    def test_billing_email_arriving_between_runs_is_answered_through_history(
        self, sandbox: Sandbox
    ) -> None:
        """Mail that arrives after a run is answered by the next one without messages.list."""
        sandbox.stripe.add_customer("ada@example.com")
        assert sandbox.cli("once").code == 0
        message_id, thread_id = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.clear_requests()

        result = sandbox.cli("once")

        assert result.code == 0 and "1 replied" in result.stdout
        assert listings(sandbox) == [] and len(history_calls(sandbox)) == 1
        [sent] = sandbox.gmail.sent_messages()
        assert sent.thread_id == thread_id
        assert REPLIED in sandbox.gmail.message_label_names(message_id)

    def test_other_new_mail_is_neither_reported_nor_recorded(self, sandbox: Sandbox) -> None:
        """Non-billing mail seen in the history is dropped as the search would, with no ledger row."""
        assert sandbox.cli("once").code == 0
        lunch, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Lunch?", "Friday?"))
        before = sandbox.gmail.message_label_names(lunch)

        result = sandbox.cli("once")

        assert result.code == 0 and "0 messages" in result.stdout
        assert sandbox.gmail.message_label_names(lunch) == before
        ledger = SqliteLedger(sandbox.folder / "state.db")
        assert ledger.get(lunch) is None
        ledger.close()

    def test_billing_email_marked_unread_again_is_reconsidered(self, sandbox: Sandbox) -> None:
        """A read billing email that someone marks unread again is answered through history."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(
            person_mail("ada@example.com", "Invoice", "?"), label_ids=("INBOX",)
        )
        assert "0 messages" in sandbox.cli("once").stdout
        api = sandbox.gmail_api()
        api.users().messages().modify(
            userId="me", id=message_id, body={"addLabelIds": ["UNREAD"]}
        ).execute()
        api.close()
        sandbox.gmail.clear_requests()

        result = sandbox.cli("once")

        assert "1 replied" in result.stdout and listings(sandbox) == []
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_message_deleted_before_its_fetch_is_skipped_as_gone(self, sandbox: Sandbox) -> None:
        """A history id whose messages.get answers 404 is skipped, not deferred, and the id advances."""
        assert sandbox.cli("once").code == 0
        gone, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(404, method="GET", path=f"/messages/{gone}$", times=10))

        result = sandbox.cli("once")

        assert result.code == 0 and "0 messages" in result.stdout
        assert "deferred" not in result.stdout
        assert stored_history_id(sandbox) == sandbox.gmail.history_id
        ledger = SqliteLedger(sandbox.folder / "state.db")
        assert ledger.get(gone) is None
        ledger.close()


class TestExpiredHistory:
    def test_expired_history_falls_back_to_a_full_sync_that_answers_what_arrived_meanwhile(
        self, sandbox: Sandbox
    ) -> None:
        """After a 404 for the stored id, the run logs the fallback, searches, and answers the backlog."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.stripe.add_customer("bob@example.org")
        assert sandbox.cli("once").code == 0
        # The daemon is down while mail arrives and Gmail drops the history it would have read.
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.deliver(person_mail("bob@example.org", "Billing question", "?"))
        sandbox.gmail.expire_history()
        sandbox.gmail.clear_requests()

        result = sandbox.cli("once")

        assert result.code == 0 and "2 replied" in result.stdout
        assert [r.status for r in history_calls(sandbox)] == [404]
        assert len(listings(sandbox)) == 1
        assert "WARNING" in result.stderr and "full sync" in result.stderr
        assert "expired" in result.stderr
        assert {s.message["To"] for s in sandbox.gmail.sent_messages()} == {
            "ada@example.com", "bob@example.org"}
        assert stored_history_id(sandbox) is not None
        sandbox.gmail.clear_requests()
        assert "0 messages" in sandbox.cli("once").stdout
        assert [r.status for r in history_calls(sandbox)] == [200] and listings(sandbox) == []


class TestDryRun:
    def test_dry_run_never_stores_a_history_id(self, sandbox: Sandbox) -> None:
        """A dry run searches the whole mailbox and leaves the stored history id as it was."""
        sandbox.stripe.add_customer("ada@example.com")
        assert sandbox.cli("once", "--dry-run").code == 0
        assert not (sandbox.folder / "state.db").exists()
        assert sandbox.cli("once").code == 0
        stored = stored_history_id(sandbox)
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.clear_requests()

        result = sandbox.cli("once", "--dry-run")

        assert "WOULD REPLY" in result.stdout
        assert len(listings(sandbox)) == 1 and history_calls(sandbox) == []
        assert stored_history_id(sandbox) == stored != sandbox.gmail.history_id


class TestDeferredMessages:
    def test_message_deferred_in_an_incremental_cycle_is_answered_by_a_later_one(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """A deferral forgets the history id, so a later full sync still finds and answers the message."""
        sandbox.stripe.add_customer("ada@example.com")
        assert sandbox.cli("once").code == 0
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(Fault(503, path="/v1/billing_portal/sessions", times=10))
        sandbox.gmail.clear_requests()

        first = sandbox.cli("once")

        assert "1 deferred" in first.stdout and listings(sandbox) == []
        assert stored_history_id(sandbox) is None
        sandbox.stripe.clear_faults()
        time_passes(sandbox, 3600)
        sandbox.gmail.clear_requests()

        second = sandbox.cli("once")

        assert "1 replied" in second.stdout, second.stdout + second.stderr
        assert len(listings(sandbox)) == 1 and history_calls(sandbox) == []
        assert len(sandbox.gmail.sent_messages()) == 1
        assert REPLIED in sandbox.gmail.message_label_names(message_id)
        assert stored_history_id(sandbox) is not None


class TestLedger:
    def test_history_id_lives_in_the_named_migration_0002_mailbox_state(
        self, sandbox: Sandbox
    ) -> None:
        """The stored history id's table comes from the recorded migration 0002_mailbox_state."""
        assert sandbox.cli("once").code == 0
        ledger = SqliteLedger(sandbox.folder / "state.db")
        try:
            assert dict(ledger.migrations())["0002_mailbox_state"] is not None
        finally:
            ledger.close()

    def test_a_read_only_ledger_refuses_to_store_a_history_id(self, sandbox: Sandbox) -> None:
        """The dry-run ledger cannot move the daemon's position, even if asked to."""
        assert sandbox.cli("once").code == 0
        ledger = SqliteLedger(sandbox.folder / "state.db", read_only=True)
        try:
            with pytest.raises(StateError):
                ledger.record_history_id(1)
        finally:
            ledger.close()
