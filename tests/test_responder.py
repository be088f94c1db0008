"""End to end: `billing-responder once` through the real Gmail and Stripe clients, over HTTP, against
the emulators. Every assertion is about what the emulators recorded: what a user would see."""

from __future__ import annotations

import base64
import re
import sqlite3
import time
from dataclasses import replace
from datetime import datetime, timedelta
from email.message import EmailMessage

import pytest

from billing_responder import billing
from billing_responder.ledger import SqliteLedger
from billing_responder.model import DONE, Action, Decision
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import MAILBOX, person_mail
from tests.conftest import Sandbox, html_of, text_of

REPLIED = "billing-responder/replied"
NEEDS_HUMAN = "billing-responder/needs-human"


class TestReplyToAKnownCustomer:
    def test_one_threaded_reply_with_the_minted_portal_url_and_a_labelled_thread(
        self, sandbox: Sandbox
    ) -> None:
        """A billing email from a customer gets exactly one reply, threaded, carrying the minted link."""
        customer = sandbox.stripe.add_customer(
            "ada@example.com", name="Ada Lovelace", subscription_statuses=["active"]
        )
        raw = person_mail("ada@example.com", "Where is my invoice?", "Hi!", name="Ada Lovelace",
                          extra_headers={"Reply-To": "attacker@evil.test",
                                         "Cc": "someone@else.test"})
        original_id, thread_id = sandbox.gmail.deliver(raw)
        original = sandbox.gmail.message(original_id).message

        result = sandbox.cli("once")

        assert result.code == 0, result.stderr
        sent = sandbox.gmail.sent_messages()
        assert len(sent) == 1
        reply = sent[0].message
        assert sent[0].thread_id == thread_id
        assert reply["To"] == "ada@example.com"
        assert reply["Cc"] is None and reply["Bcc"] is None
        assert reply["Subject"] == "Re: Where is my invoice?"
        assert reply["In-Reply-To"] == original["Message-ID"]
        assert reply["References"] == original["Message-ID"]
        assert reply["Auto-Submitted"] == "auto-replied"
        assert reply["Message-ID"] != original["Message-ID"]
        assert reply["Message-ID"].endswith("@acme-saas.test>")
        assert MAILBOX in str(reply["From"])

        sessions = sandbox.stripe.portal_sessions()
        assert len(sessions) == 1
        assert sessions[0].customer == customer
        assert sessions[0].return_url == "https://acme-saas.test/account"
        assert sessions[0].url in text_of(reply)
        assert sessions[0].url in html_of(reply)
        assert "Ada Lovelace" in text_of(reply)

        assert REPLIED in sandbox.gmail.thread_label_names(thread_id)
        assert REPLIED in sandbox.gmail.message_label_names(original_id)
        assert "1 replied" in result.stdout

    def test_reply_is_sent_as_raw_json_into_the_thread(self, sandbox: Sandbox) -> None:
        """messages.send gets {"raw": base64url, "threadId": ...}, not a media upload."""
        sandbox.stripe.add_customer("ada@example.com", subscription_statuses=["active"])
        _, thread_id = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.cli("once")
        sends = [r for r in sandbox.gmail.requests if r.path.endswith("/messages/send")]
        assert len(sends) == 1
        body = sends[0].json()
        assert body["threadId"] == thread_id
        raw = base64.urlsafe_b64decode(body["raw"] + "=" * (-len(body["raw"]) % 4))
        assert b"Auto-Submitted: auto-replied" in raw

    def test_portal_session_uses_an_idempotency_key_from_the_message_id(
        self, sandbox: Sandbox
    ) -> None:
        """The session is minted with an Idempotency-Key derived from the Gmail message id."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Billing", "?"))
        sandbox.cli("once")
        creates = [r for r in sandbox.stripe.requests if r.path == "/v1/billing_portal/sessions"]
        assert len(creates) == 1
        assert message_id in creates[0].headers["idempotency-key"]

    def test_crash_after_minting_replays_the_same_session_on_restart(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """A run that minted a session but never sent is resumed without minting a second one."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Billing", "?"))
        # The first run dies at the send (nothing reaches Gmail), after minting.
        sandbox.gmail.inject_fault(Fault(503, method="POST", path="/messages/send"))
        sandbox.cli("once")
        first_key = sandbox.stripe.portal_sessions()[0].idempotency_key
        _time_passes(sandbox, 60)

        sandbox.cli("once")

        sessions = sandbox.stripe.portal_sessions()
        assert len(sessions) == 1
        creates = [r for r in sandbox.stripe.requests if r.path == "/v1/billing_portal/sessions"]
        assert [r.headers["idempotency-key"] for r in creates] == [first_key, first_key]
        sent = sandbox.gmail.sent_messages()
        assert len(sent) == 1 and sessions[0].url in text_of(sent[0].message)
        assert REPLIED in sandbox.gmail.message_label_names(message_id)

    def test_second_once_sends_nothing_more(self, sandbox: Sandbox) -> None:
        """Running `once` again neither replies, labels nor mints anything new."""
        sandbox.stripe.add_customer("ada@example.com", subscription_statuses=["active"])
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice please", "?"))
        assert sandbox.cli("once").code == 0
        writes_before = (len(sandbox.gmail.writes()), len(sandbox.stripe.writes()))

        second = sandbox.cli("once")

        assert second.code == 0
        assert len(sandbox.gmail.sent_messages()) == 1
        assert len(sandbox.stripe.portal_sessions()) == 1
        assert (len(sandbox.gmail.writes()), len(sandbox.stripe.writes())) == writes_before

    def test_handled_but_unlabelled_message_is_not_answered_again(self, sandbox: Sandbox) -> None:
        """Even if someone removes the label, the ledger stops a second reply across restarts."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.cli("once")
        label = sandbox.gmail.label_id(REPLIED)
        sandbox.gmail.clear_requests()
        # A person strips the label by hand in Gmail's UI.
        api = sandbox.gmail_api()
        api.users().messages().modify(
            userId="me", id=message_id, body={"removeLabelIds": [label]}
        ).execute()
        api.close()

        assert sandbox.cli("once").code == 0
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_mark_read_removes_unread_from_the_answered_message(self, sandbox: Sandbox) -> None:
        """With [reply] mark_read, the answered message loses UNREAD in the same modify call."""
        text = sandbox.config_path.read_text().replace(
            'signature = "The Acme support team"',
            'signature = "The Acme support team"\nmark_read = true',
        )
        sandbox.config_path.write_text(text)
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.cli("once")
        labels = sandbox.gmail.message_label_names(message_id)
        assert "UNREAD" not in labels and REPLIED in labels
        modifies = [r for r in sandbox.gmail.requests if r.path.endswith("/modify")]
        assert len(modifies) == 1


class TestCustomerLookup:
    def test_sender_with_different_case_still_finds_the_customer(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Bob@Example.ORG finds bob@example.org even before Search has indexed the record."""
        monkeypatch.setattr(sandbox.stripe, "search_delay_seconds", 60.0)
        customer = sandbox.stripe.add_customer("bob@example.org", name="Bob")
        sandbox.gmail.deliver(person_mail("Bob@Example.ORG", "Invoice question", "?"))
        assert sandbox.cli("once").code == 0
        sessions = sandbox.stripe.portal_sessions()
        assert [s.customer for s in sessions] == [customer]
        assert sandbox.gmail.sent_messages()[0].message["To"] == "Bob@Example.ORG"

    def test_customer_stored_with_capitals_is_found_once_search_has_indexed_it(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A record stored as Carol@Example.com, beyond the case-sensitive list filter, is found by Search."""
        monkeypatch.setattr(sandbox.stripe, "search_delay_seconds", 60.0)
        customer = sandbox.stripe.add_customer("Carol@Example.com")
        monkeypatch.setattr(sandbox.stripe, "clock", lambda: time.time() + 120)
        sandbox.gmail.deliver(person_mail("carol@example.com", "Billing", "?"))
        assert sandbox.cli("once").code == 0
        assert [s.customer for s in sandbox.stripe.portal_sessions()] == [customer]

    def test_customer_not_yet_searchable_is_escalated_not_answered_wrongly(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Before Search indexes Carol@Example.com, carol@example.com gets needs-human, no link."""
        monkeypatch.setattr(sandbox.stripe, "search_delay_seconds", 60.0)
        sandbox.stripe.add_customer("Carol@Example.com")
        _, thread_id = sandbox.gmail.deliver(person_mail("carol@example.com", "Billing", "?"))
        assert sandbox.cli("once").code == 0
        assert sandbox.stripe.portal_sessions() == []
        assert NEEDS_HUMAN in sandbox.gmail.thread_label_names(thread_id)

    def test_search_outage_still_answers_a_customer_the_exact_lookup_found(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """If customers.search keeps failing, a record the list lookup found is still answered."""
        customer = sandbox.stripe.add_customer("ada@example.com")
        sandbox.stripe.inject_fault(Fault(500, path="/v1/customers/search", times=20))
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        assert sandbox.cli("once").code == 0
        assert [s.customer for s in sandbox.stripe.portal_sessions()] == [customer]

    def test_two_customers_with_one_email_picks_the_one_with_a_live_subscription(
        self, sandbox: Sandbox
    ) -> None:
        """The newest record with an active/trialing/past_due subscription wins over a newer dead one."""
        now = int(time.time())
        sandbox.stripe.add_customer("grace@example.net", created=now - 900,
                                    subscription_statuses=["canceled"])
        live = sandbox.stripe.add_customer("grace@example.net", created=now - 600,
                                           subscription_statuses=["trialing"])
        sandbox.stripe.add_customer("grace@example.net", created=now - 300)
        sandbox.gmail.deliver(person_mail("grace@example.net", "Billing", "?"))
        assert sandbox.cli("once").code == 0
        assert [s.customer for s in sandbox.stripe.portal_sessions()] == [live]

    def test_two_customers_without_subscriptions_picks_the_newest(self, sandbox: Sandbox) -> None:
        """Without any live subscription, the most recently created record is used."""
        now = int(time.time())
        sandbox.stripe.add_customer("grace@example.net", created=now - 900)
        newest = sandbox.stripe.add_customer("grace@example.net", created=now - 100)
        sandbox.gmail.deliver(person_mail("grace@example.net", "Billing", "?"))
        sandbox.cli("once")
        assert [s.customer for s in sandbox.stripe.portal_sessions()] == [newest]

    def test_unknown_sender_is_labelled_needs_human_and_gets_no_link(
        self, sandbox: Sandbox
    ) -> None:
        """No Stripe customer: no reply, no portal session, the thread is labelled needs-human."""
        message_id, thread_id = sandbox.gmail.deliver(
            person_mail("stranger@unknown.test", "Billing problem", "charged twice")
        )
        result = sandbox.cli("once")
        assert result.code == 0
        assert sandbox.gmail.sent_messages() == []
        assert sandbox.stripe.portal_sessions() == []
        labels = sandbox.gmail.thread_label_names(thread_id)
        assert NEEDS_HUMAN in labels and REPLIED not in labels
        assert "no Stripe customer" in result.stdout
        # Escalated once: the next cycle does not label or look it up again.
        sandbox.stripe.clear_requests()
        sandbox.gmail.clear_requests()
        sandbox.cli("once")
        assert not [r for r in sandbox.stripe.requests if r.path.startswith("/v1/customers/")]
        assert not [r for r in sandbox.stripe.requests if r.param("email")]
        assert sandbox.gmail.writes() == []
        assert message_id in {e.gmail_id for e in _ledger(sandbox).entries()}


class TestWhatIsNotAnswered:
    def test_non_billing_mail_is_untouched(self, sandbox: Sandbox) -> None:
        """A message whose subject mentions no keyword gets no reply, no label and no lookup."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Lunch?", "Friday?"))
        before = sandbox.gmail.message_label_names(message_id)
        assert sandbox.cli("once").code == 0
        assert sandbox.gmail.sent_messages() == []
        assert sandbox.gmail.message_label_names(message_id) == before
        assert not [r for r in sandbox.stripe.requests if "email" in r.query]

    def test_keyword_inside_a_longer_word_is_not_billing(self, sandbox: Sandbox) -> None:
        """'Invoicing software demo' passes Gmail's search but not the local whole-word check."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Billingsgate fish market", "?"))
        sandbox.cli("once")
        assert sandbox.gmail.sent_messages() == []

    def test_auto_reply_from_a_paying_customer_is_skipped(self, sandbox: Sandbox) -> None:
        """An out-of-office reply is never answered, even from a customer and about an invoice."""
        sandbox.stripe.add_customer("ada@example.com", subscription_statuses=["active"])
        sandbox.gmail.deliver(person_mail(
            "ada@example.com", "Automatic reply: Your invoice", "Away",
            extra_headers={"Auto-Submitted": "auto-replied"}))
        result = sandbox.cli("once")
        assert result.code == 0
        assert sandbox.gmail.sent_messages() == []
        assert sandbox.stripe.portal_sessions() == []
        assert "skipped" in result.stdout

    def test_mail_from_the_mailbox_itself_is_skipped(self, sandbox: Sandbox) -> None:
        """The responder never answers its own mailbox's mail."""
        sandbox.stripe.add_customer(MAILBOX)
        sandbox.gmail.deliver(person_mail(MAILBOX, "Invoice", "note to self"))
        sandbox.cli("once")
        assert sandbox.gmail.sent_messages() == []


class TestEncodedSubjects:
    def test_rfc2047_subject_is_matched_and_quoted_decoded(self, sandbox: Sandbox) -> None:
        """=?UTF-8?B?...?= subjects are decoded before matching and in the reply's Subject."""
        sandbox.stripe.add_customer("jose@example.es", name="José Núñez")
        encoded = "=?UTF-8?B?" + base64.b64encode("¿Dónde está mi invoice?".encode()).decode() + "?="
        sandbox.gmail.deliver(person_mail("jose@example.es", encoded, "Hola"))
        assert sandbox.cli("once").code == 0
        sent = sandbox.gmail.sent_messages()
        assert len(sent) == 1
        assert sent[0].message["Subject"] == "Re: ¿Dónde está mi invoice?"
        assert "José Núñez" in text_of(sent[0].message)


class TestDryRun:
    def test_dry_run_makes_no_write_request_to_either_emulator(self, sandbox: Sandbox) -> None:
        """--dry-run reads and looks up, but sends, labels, creates and mints nothing."""
        sandbox.stripe.add_customer("ada@example.com", name="Ada", subscription_statuses=["active"])
        sandbox.gmail.deliver(person_mail("ada@example.com", "Where is my invoice?", "?"))
        sandbox.gmail.deliver(person_mail("stranger@unknown.test", "Billing", "?"))

        result = sandbox.cli("once", "--dry-run")

        assert result.code == 0, result.stderr
        assert sandbox.gmail.writes() == []
        assert sandbox.stripe.writes() == []
        assert any(r.path.endswith("/messages") for r in sandbox.gmail.requests)
        assert any(r.path == "/v1/customers" for r in sandbox.stripe.requests)
        assert not (sandbox.folder / "state.db").exists()

    def test_dry_run_prints_recipient_and_full_reply_with_a_placeholder_link(
        self, sandbox: Sandbox
    ) -> None:
        """The review shows the recipient, the whole reply text and an obviously fake link."""
        sandbox.stripe.add_customer("ada@example.com", name="Ada Lovelace")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Where is my invoice?", "?"))
        sandbox.gmail.deliver(person_mail("stranger@unknown.test", "Billing", "?"))
        result = sandbox.cli("once", "--dry-run")
        assert "Reply to: ada@example.com" in result.stdout
        assert "Hello Ada Lovelace," in result.stdout
        assert "DRY-RUN-NO-SESSION-CREATED" in result.stdout
        assert "WOULD ESCALATE" in result.stdout
        assert "no Stripe customer" in result.stdout

    def test_dry_run_then_real_run_answers_normally(self, sandbox: Sandbox) -> None:
        """A dry run leaves no trace that would stop the real run from answering."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.cli("once", "--dry-run")
        sandbox.cli("once")
        assert len(sandbox.gmail.sent_messages()) == 1


class TestFailuresLoseNothing:
    def test_stripe_outage_defers_the_message_and_the_next_cycle_answers(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """A Stripe 503 that outlasts the retries leaves the message unanswered and unmarked."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(Fault(503, path="/v1/billing_portal/sessions", times=10))

        first = sandbox.cli("once")

        assert first.code == 0
        assert "1 deferred" in first.stdout
        assert sandbox.gmail.sent_messages() == []
        assert REPLIED not in sandbox.gmail.message_label_names(message_id)
        sandbox.stripe.clear_faults()
        _time_passes(sandbox, 60)
        assert sandbox.cli("once").code == 0
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_transient_gmail_error_on_a_read_is_retried_within_the_cycle(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """A 429 with Retry-After on messages.get is retried, and the reply goes out this cycle."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(429, method="GET", path=r"/messages/[0-9a-f]+$",
                                         reason="rateLimitExceeded",
                                         headers={"Retry-After": "0"}))
        assert sandbox.cli("once").code == 0
        assert len(sandbox.gmail.sent_messages()) == 1
        gets = [r for r in sandbox.gmail.requests if re.search(r"/messages/[0-9a-f]+$", r.path)]
        assert [r.status for r in gets] == [429, 200]

    def test_send_whose_answer_is_lost_is_not_sent_again(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """Gmail stores the reply but answers 503: no resend now, and the next cycle finds it."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(503, method="POST", path="/messages/send", after=True))

        first = sandbox.cli("once")

        assert first.code == 0 and "1 deferred" in first.stdout
        assert len(sandbox.gmail.sent_messages()) == 1
        assert REPLIED not in sandbox.gmail.message_label_names(message_id)
        _time_passes(sandbox, 60)
        second = sandbox.cli("once")
        assert second.code == 0 and "1 replied" in second.stdout
        assert len(sandbox.gmail.sent_messages()) == 1
        assert len(sandbox.stripe.portal_sessions()) == 1
        assert REPLIED in sandbox.gmail.message_label_names(message_id)

    def test_send_refused_then_answered_afresh_after_the_customer_changed(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """A failed attempt does not pin its idempotency key: a new attempt mints for the new choice."""
        now = int(time.time())
        sandbox.stripe.add_customer("ada@example.com", created=now - 900)
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(503, method="POST", path="/messages/send"))
        assert "1 deferred" in sandbox.cli("once").stdout
        live = sandbox.stripe.add_customer("ada@example.com", created=now - 60,
                                           subscription_statuses=["active"])
        _time_passes(sandbox, 60)

        second = sandbox.cli("once")

        assert "1 replied" in second.stdout, second.stdout + second.stderr
        sessions = sandbox.stripe.portal_sessions()
        assert [s.customer for s in sessions][-1] == live
        assert len({s.idempotency_key for s in sessions}) == len(sessions) == 2
        sent = sandbox.gmail.sent_messages()
        assert len(sent) == 1 and sessions[-1].url in text_of(sent[0].message)

    def test_long_subject_reply_stays_in_the_thread(self, sandbox: Sandbox) -> None:
        """A 400-character subject is repeated whole, so Gmail files the reply in the same thread."""
        sandbox.stripe.add_customer("ada@example.com")
        subject = "Invoice " + " ".join(f"item{n:03d}" for n in range(56))
        assert len(subject) > 400
        _, thread_id = sandbox.gmail.deliver(person_mail("ada@example.com", subject, "?"))
        sandbox.cli("once")
        sent = sandbox.gmail.sent_messages()
        assert len(sent) == 1
        assert sent[0].thread_id == thread_id
        assert sent[0].message["Subject"] == "Re: " + subject

    def test_a_bug_on_one_message_defers_it_and_the_cycle_goes_on(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unexpected exception costs only that message a cycle; the next message is answered."""
        from billing_responder import pipeline  # noqa: PLC0415

        sandbox.stripe.add_customer("ada@example.com")
        sandbox.stripe.add_customer("bob@example.org")
        bad, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.deliver(person_mail("bob@example.org", "Invoice", "?"))
        real_decide = pipeline.triage.decide

        def decide_with_a_bug(message, policy):  # type: ignore[no-untyped-def]
            if message.id == bad:
                raise KeyError("a bug")
            return real_decide(message, policy)

        monkeypatch.setattr(pipeline.triage, "decide", decide_with_a_bug)
        result = sandbox.cli("once")
        assert result.code == 0
        assert "1 replied, 1 deferred" in result.stdout
        assert [s.message["To"] for s in sandbox.gmail.sent_messages()] == ["bob@example.org"]
        entry = _ledger(sandbox).get(bad)
        assert entry is not None and entry.failures == 1 and "KeyError" in (entry.last_error or "")

    def test_interrupted_reply_found_in_the_mailbox_is_not_sent_again(
        self, sandbox: Sandbox
    ) -> None:
        """An intent whose reply did reach Gmail (crash before recording) is finished, not resent."""
        our_id = "<crashed-reply-1@acme-saas.test>"
        message_id = _interrupted_attempt(sandbox, our_id)
        # The reply the crashed run had sent:
        reply = EmailMessage()
        reply["From"], reply["To"], reply["Subject"] = MAILBOX, "ada@example.com", "Re: Invoice"
        reply["Message-ID"] = our_id
        reply.set_content("link")
        sandbox.gmail.deliver(bytes(reply), label_ids=("SENT",))

        assert sandbox.cli("once").code == 0

        assert not [r for r in sandbox.gmail.requests if r.path.endswith("/messages/send")]
        assert sandbox.stripe.portal_sessions() == []
        assert REPLIED in sandbox.gmail.message_label_names(message_id)

    def test_interrupted_reply_not_in_the_mailbox_is_sent_once_under_its_recorded_id(
        self, sandbox: Sandbox
    ) -> None:
        """An intent whose reply never reached Gmail is resumed: one reply, with the recorded Message-ID."""
        our_id = "<never-sent-1@acme-saas.test>"
        _interrupted_attempt(sandbox, our_id)
        assert sandbox.cli("once").code == 0
        sent = sandbox.gmail.sent_messages()
        assert [s.message["Message-ID"] for s in sent] == [our_id]


class TestFatalErrors:
    def test_rejected_stripe_key_exits_1_with_one_clear_line(self, sandbox: Sandbox) -> None:
        """A key Stripe refuses stops the run at start with exit 1, before touching any mail."""
        (sandbox.folder / "stripe.key").write_text("sk_test_wrong0000000000")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        result = sandbox.cli("once")
        assert result.code == 1
        assert result.stderr.strip().splitlines()[-1].startswith("billing-responder: Stripe:")
        assert "sk_test_wrong0000000000" not in result.stderr
        assert sandbox.gmail.writes() == []

    def test_revoked_gmail_token_exits_3_and_says_what_to_do(self, sandbox: Sandbox) -> None:
        """invalid_grant: exit 3 (authorisation lost), the problem and the fixing command on one last line, no traceback."""
        sandbox.gmail.revoke()
        result = sandbox.cli("once")
        assert result.code == 3
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("billing-responder: Gmail authorisation lost")
        assert "invalid_grant" in line
        assert line.endswith("; to fix it, run: billing-responder auth")
        assert "Traceback" not in result.stderr

    def test_bad_config_exits_2_naming_file_and_key(self, sandbox: Sandbox) -> None:
        """A wrong type in the config exits 2 with one line naming the file and the key."""
        sandbox.set_config('[schedule]\ninterval_seconds = "often"\n')
        result = sandbox.cli("once")
        assert result.code == 2
        line = result.stderr.strip()
        assert "\n" not in line
        assert str(sandbox.config_path) in line and "schedule.interval_seconds" in line

    def test_gmail_unreachable_after_retries_exits_1(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """If Gmail keeps answering 503 to the listing, `once` exits 1 with one line."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.inject_fault(Fault(503, path=r"/messages$", times=50))
        result = sandbox.cli("once")
        assert result.code == 1
        assert re.search(r"Gmail: HTTP 503", result.stderr)


class TestSecrets:
    def test_no_portal_url_in_logs_output_or_database(
        self, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The minted URL reaches only the reply: not stdout, not stderr, not logs, not the ledger."""
        caplog.set_level("DEBUG")
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        result = sandbox.cli("--log-level", "DEBUG", "once")
        url = sandbox.stripe.portal_sessions()[0].url
        assert url not in result.stdout and url not in result.stderr
        assert url not in caplog.text
        dump = "\n".join(sqlite3.connect(sandbox.folder / "state.db").iterdump())
        assert url not in dump
        assert sandbox.stripe.portal_sessions()[0].id in dump


def _ledger(sandbox: Sandbox) -> SqliteLedger:
    return SqliteLedger(sandbox.folder / "state.db")


def _time_passes(sandbox: Sandbox, seconds: float = 3600) -> None:
    """Move every ledger timestamp back, as if ``seconds`` had passed since it was written."""
    shift = timedelta(seconds=seconds)

    def earlier(value: str | None) -> str | None:
        if value is None:
            return None
        return (datetime.fromisoformat(value) - shift).isoformat(timespec="seconds")

    db = sqlite3.connect(sandbox.folder / "state.db")
    with db:
        rows = db.execute("SELECT gmail_id, created_at, updated_at, sent_at FROM messages")
        for gmail_id, created, updated, sent in rows.fetchall():
            db.execute(
                "UPDATE messages SET created_at = ?, updated_at = ?, sent_at = ? WHERE gmail_id = ?",
                (earlier(created), earlier(updated), earlier(sent), gmail_id),
            )
    db.close()


def _interrupted_attempt(sandbox: Sandbox, reply_message_id: str) -> str:
    """A customer's billing email whose reply a crashed run had recorded as about to be sent."""
    sandbox.stripe.add_customer("ada@example.com")
    message_id, thread_id = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
    ledger = _ledger(sandbox)
    ledger.record_intent(message_id, thread_id,
                         Decision(Action.REPLY, ("x",), "ada@example.com", "Invoice"),
                         customer_id="cus_x", reply_message_id=reply_message_id)
    ledger.close()
    return message_id


class TestRawHeaderValues:
    def test_encoded_subject_is_matched_when_gmail_hands_back_raw_encoded_words(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If format=metadata returns =?UTF-8?Q?...?= undecoded, triage still decodes and matches."""
        monkeypatch.setattr(sandbox.gmail, "decode_header_values", False)
        sandbox.stripe.add_customer("jose@example.es")
        sandbox.gmail.deliver(person_mail("jose@example.es", "=?UTF-8?Q?Factura_/_Invoice_m=C3=A1rzo?=", "?"))
        assert sandbox.cli("once").code == 0
        sent = sandbox.gmail.sent_messages()
        assert [s.message["Subject"] for s in sent] == ["Re: Factura / Invoice márzo"]


class TestSenderAuthentication:
    def test_unauthenticated_billing_mail_from_a_customer_gets_no_link(
        self, sandbox: Sandbox
    ) -> None:
        """Mail whose trusted Authentication-Results does not pass is never answered with a link."""
        sandbox.stripe.add_customer("ada@example.com", subscription_statuses=["active"])
        raw = person_mail("ada@example.com", "Invoice", "?").replace(
            b"dmarc=pass", b"dmarc=fail").replace(b"dkim=pass", b"dkim=fail").replace(
            b"spf=pass", b"spf=softfail")
        sandbox.gmail.deliver(raw)
        result = sandbox.cli("once")
        assert result.code == 0
        assert sandbox.gmail.sent_messages() == []
        assert sandbox.stripe.portal_sessions() == []
        assert "not authenticated" in result.stdout

    def test_configured_authserv_id_is_the_one_trusted(self, sandbox: Sandbox) -> None:
        """With [security] authserv_id set to another server, Gmail's stamp no longer counts."""
        sandbox.set_config('[security]\nauthserv_id = "mx.acme-relay.test"\n')
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.cli("once")
        assert sandbox.gmail.sent_messages() == []


class TestPaging:
    def test_every_candidate_beyond_the_first_page_is_handled(self, sandbox: Sandbox) -> None:
        """With more candidates than one messages.list page holds (500), all are looked at."""
        total = 503
        for number in range(total):
            sandbox.gmail.deliver(person_mail(
                "ada@example.com", f"Automatic reply: Invoice {number}", "away",
                extra_headers={"Auto-Submitted": "auto-replied"}))
        result = sandbox.cli("once")
        assert result.code == 0
        assert f"{total} messages: {total} skipped" in result.stdout
        listings = [r for r in sandbox.gmail.requests if r.path.endswith("/messages")]
        assert len(listings) == 2
        assert listings[1].param("pageToken")


class TestWhatTheLedgerAndMailboxShow:
    def test_skipped_message_is_recorded_and_not_fetched_again(self, sandbox: Sandbox) -> None:
        """A skip is final: the ledger holds it as done, and the next cycle does not even fetch it."""
        message_id, _ = sandbox.gmail.deliver(person_mail(
            "ada@example.com", "Automatic reply: Your invoice", "Away",
            extra_headers={"Auto-Submitted": "auto-replied"}))
        sandbox.cli("once")
        entry = _ledger(sandbox).get(message_id)
        assert entry is not None and entry.state == DONE and entry.action == "skip"
        assert any("Auto-Submitted" in r for r in entry.reasons)
        sandbox.gmail.clear_requests()
        _ledger(sandbox).record_history_id(None)  # a full search sync lists the message again
        assert "1 message" in sandbox.cli("once").stdout
        assert not [r for r in sandbox.gmail.requests if r.path.endswith(f"/messages/{message_id}")]

    def test_ledger_records_the_sent_reply_and_its_session(self, sandbox: Sandbox) -> None:
        """After a reply, the row is done and names the reply's Gmail id, Message-ID and session."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.cli("once")
        sent = sandbox.gmail.sent_messages()
        entry = _ledger(sandbox).get(message_id)
        assert entry is not None and entry.state == DONE
        assert entry.sent_gmail_id == sent[0].id
        assert entry.reply_message_id == sent[0].message["Message-ID"]
        assert entry.portal_session_id == sandbox.stripe.portal_sessions()[0].id

    def test_older_message_is_answered_first(self, sandbox: Sandbox) -> None:
        """Gmail lists newest first; within a page the responder takes the oldest waiting message first."""
        sandbox.set_config("[concurrency]\nworkers = 1")  # with more, both are in flight at once
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.stripe.add_customer("bob@example.org")
        now_ms = int(time.time() * 1000)
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"),
                              internal_date_ms=now_ms - 60_000)
        sandbox.gmail.deliver(person_mail("bob@example.org", "Invoice", "?"),
                              internal_date_ms=now_ms)
        sandbox.cli("once")
        sends = [r for r in sandbox.gmail.requests if r.path.endswith("/messages/send")]
        assert len(sends) == 2
        assert [s.message["To"] for s in sandbox.gmail.sent_messages()] == [
            "ada@example.com", "bob@example.org"]

    def test_messages_are_fetched_without_their_bodies(self, sandbox: Sandbox) -> None:
        """Every messages.get asks for format=metadata: no body is ever downloaded."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "secret body"))
        sandbox.cli("once")
        gets = [r for r in sandbox.gmail.requests
                if r.method == "GET" and re.search(r"/messages/[0-9a-f]+$", r.path)]
        assert gets
        assert {r.param("format") for r in gets} == {"metadata"}

    def test_candidate_search_excludes_both_handled_labels(self, sandbox: Sandbox) -> None:
        """messages.list is asked for unread inbox mail without the replied and needs-human labels."""
        sandbox.cli("once")
        listing = next(r for r in sandbox.gmail.requests if r.path.endswith("/messages"))
        query = listing.param("q") or ""
        assert "is:unread" in query and "in:inbox" in query
        assert "subject:(invoice OR billing)" in query
        assert "-label:billing-responder-replied" in query
        assert "-label:billing-responder-needs-human" in query

    def test_answered_message_stays_unread_by_default(self, sandbox: Sandbox) -> None:
        """Without [reply] mark_read, the answered message is labelled but keeps UNREAD."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.cli("once")
        labels = sandbox.gmail.message_label_names(message_id)
        assert REPLIED in labels and "UNREAD" in labels


class TestMoreFailures:
    def test_portal_permission_missing_stops_once_with_exit_1(self, sandbox: Sandbox) -> None:
        """A key that can read customers but not mint portal sessions exits 1; nothing is marked."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(Fault(403, path="/v1/billing_portal/sessions", times=10))
        result = sandbox.cli("once")
        assert result.code == 1
        assert "lacks a permission" in result.stderr
        assert sandbox.gmail.sent_messages() == []
        assert REPLIED not in sandbox.gmail.message_label_names(message_id)
        entry = _ledger(sandbox).get(message_id)
        assert entry is None or (entry.state != DONE and entry.failures == 0)

    def test_dry_run_with_a_failing_fetch_leaves_the_ledger_untouched(
        self, sandbox: Sandbox, fast_retries: None
    ) -> None:
        """A message deferred during a dry run is reported, not recorded: the ledger file is unchanged."""
        sandbox.gmail.deliver(person_mail("bot@example.com", "Invoice", "?",
                                          extra_headers={"Auto-Submitted": "auto-generated"}))
        assert sandbox.cli("once").code == 0  # a real run: the ledger file now exists
        files_before = sorted(p.name for p in sandbox.folder.iterdir())
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        before = (sandbox.folder / "state.db").read_bytes()
        sandbox.gmail.inject_fault(Fault(503, method="GET", path=f"/messages/{message_id}$",
                                         times=100))
        result = sandbox.cli("once", "--dry-run")
        assert result.code == 0, result.stderr
        assert "DEFERRED" in result.stdout
        assert (sandbox.folder / "state.db").read_bytes() == before
        assert sorted(p.name for p in sandbox.folder.iterdir()) == files_before
        assert _ledger(sandbox).get(message_id) is None

    def test_message_deleted_before_fetch_is_deferred_and_others_answered(
        self, sandbox: Sandbox
    ) -> None:
        """A 404 on messages.get defers only that message; the cycle goes on and exits 0."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.stripe.add_customer("bob@example.org")
        gone, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.deliver(person_mail("bob@example.org", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(404, method="GET", path=f"/messages/{gone}$", times=10))
        result = sandbox.cli("once")
        assert result.code == 0, result.stderr
        assert "1 replied, 1 deferred" in result.stdout
        assert [s.message["To"] for s in sandbox.gmail.sent_messages()] == ["bob@example.org"]

    def test_retry_after_beyond_the_cap_defers_without_retrying(
        self, sandbox: Sandbox, fast_retries: None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A 429 asking for longer than max_retry_after is not retried in the cycle: the message waits."""
        monkeypatch.setattr(billing, "STRIPE_RETRY",
                            replace(billing.STRIPE_RETRY, max_retry_after=0.01))
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(Fault(429, path="/v1/billing_portal/sessions", times=10,
                                          reason="rate_limit", headers={"Retry-After": "1"}))
        result = sandbox.cli("once")
        assert "1 deferred" in result.stdout
        assert len([r for r in sandbox.stripe.requests
                    if r.path == "/v1/billing_portal/sessions"]) == 1

    def test_live_subscription_wins_before_search_has_indexed_the_records(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With Search lagging, the exact lookup alone still sees subscriptions and picks the live record."""
        monkeypatch.setattr(sandbox.stripe, "search_delay_seconds", 60.0)
        now = int(time.time())
        live = sandbox.stripe.add_customer("grace@example.net", created=now - 900,
                                           subscription_statuses=["active"])
        sandbox.stripe.add_customer("grace@example.net", created=now - 60)
        sandbox.gmail.deliver(person_mail("grace@example.net", "Invoice", "?"))
        assert sandbox.cli("once").code == 0
        assert [s.customer for s in sandbox.stripe.portal_sessions()] == [live]


class TestPortalSessionParameters:
    def test_configured_portal_configuration_and_locale_are_sent(self, sandbox: Sandbox) -> None:
        """[stripe] portal_configuration and locale reach billing_portal.sessions.create."""
        configuration = sandbox.stripe.default_configuration_id
        text = sandbox.config_path.read_text().replace(
            'return_url = "https://acme-saas.test/account"\n',
            'return_url = "https://acme-saas.test/account"\n'
            f'portal_configuration = "{configuration}"\nlocale = "de"\n')
        sandbox.config_path.write_text(text)
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        assert sandbox.cli("once").code == 0
        [create] = [r for r in sandbox.stripe.requests if r.path == "/v1/billing_portal/sessions"]
        form = create.form()
        assert form["configuration"] == [configuration] and form["locale"] == ["de"]
        assert form["return_url"] == ["https://acme-saas.test/account"]
        [session] = sandbox.stripe.portal_sessions()
        assert (session.configuration, session.locale) == (configuration, "de")
