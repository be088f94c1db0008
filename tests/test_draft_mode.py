"""Draft mode (``[reply] mode = "draft"``): the reply is left as a Gmail draft in the thread for a
person to check and send, and the exactly-once promise holds for drafts as it does for sends.

First the Gmail emulator's drafts, through the real client (their shapes, threading, where they
show and where not, quota); then `once` in draft mode end to end, asserting on what the emulators
recorded; then faults on drafts.create (an answer lost after the draft was made, a 5xx before it).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import pytest
from googleapiclient.errors import HttpError

from billing_responder.model import DONE, SENDING
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import MAILBOX, person_mail
from tests.conftest import Sandbox, text_of
from tests.test_responder import NEEDS_HUMAN, REPLIED, _ledger, _time_passes

DRAFTED = "billing-responder/drafted"
CUSTOMER = "ada@example.com"
DRAFTS_CREATE = r"/users/me/drafts$"


def draft_mode(sandbox: Sandbox) -> None:
    """Switch the sandbox config to ``[reply] mode = "draft"``."""
    text = sandbox.config_path.read_text(encoding="utf-8")
    sandbox.config_path.write_text(text.replace("[reply]\n", '[reply]\nmode = "draft"\n'))


def encoded(message: EmailMessage) -> str:
    return base64.urlsafe_b64encode(bytes(message)).decode("ascii")


def reply_to(sandbox: Sandbox, original_id: str, *, subject: str | None = None) -> EmailMessage:
    """A reply to a delivered message, as a person's draft would be written."""
    original = sandbox.gmail.message(original_id).message
    reply = EmailMessage()
    reply["From"] = MAILBOX
    reply["To"] = CUSTOMER
    reply["Subject"] = subject or f"Re: {original['Subject']}"
    reply["In-Reply-To"] = original["Message-ID"]
    reply["References"] = original["Message-ID"]
    reply["Message-ID"] = make_msgid(domain="acme-saas.test")
    reply.set_content("Here is your link.")
    return reply


def create_draft(api: Any, message: EmailMessage, thread_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"raw": encoded(message)}
    if thread_id is not None:
        body["threadId"] = thread_id
    draft: dict[str, Any] = api.users().drafts().create(
        userId="me", body={"message": body}
    ).execute()
    return draft


@pytest.fixture
def api(sandbox: Sandbox) -> Iterator[Any]:
    """The real Gmail client against the emulator, acting as the person at the mailbox."""
    client = sandbox.gmail_api()
    yield client
    client.close()


def listed(api: Any, query: str) -> set[str]:
    found = api.users().messages().list(userId="me", q=query).execute()
    return {m["id"] for m in found.get("messages", [])}


class TestGmailEmulatorDrafts:
    def test_create_answers_a_draft_whose_message_carries_only_the_draft_label(
        self, sandbox: Sandbox, api: Any
    ) -> None:
        """drafts.create answers {id, message: {id, threadId, labelIds: [DRAFT]}}, as Gmail does."""
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))

        draft = create_draft(api, reply_to(sandbox, original_id), thread_id)

        assert re.fullmatch(r"r-?\d+", draft["id"])
        assert draft["message"]["threadId"] == thread_id
        assert draft["message"]["labelIds"] == ["DRAFT"]
        assert [d.id for d in sandbox.gmail.drafts()] == [draft["id"]]
        assert sandbox.gmail.drafts()[0].message.id == draft["message"]["id"]

    def test_a_draft_joins_the_named_thread_only_when_its_subject_matches(
        self, sandbox: Sandbox, api: Any
    ) -> None:
        """Threading as for sends: threadId named and subject matching; else a thread of its own."""
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))

        unnamed = create_draft(api, reply_to(sandbox, original_id), None)
        other = create_draft(api, reply_to(sandbox, original_id, subject="Re: Else"), thread_id)
        joined = create_draft(api, reply_to(sandbox, original_id), thread_id)

        assert unnamed["message"]["threadId"] != thread_id
        assert other["message"]["threadId"] != thread_id
        assert joined["message"]["threadId"] == thread_id

    def test_a_draft_shows_in_its_thread_and_in_searches_but_is_not_sent(
        self, sandbox: Sandbox, api: Any
    ) -> None:
        """threads.get, in:drafts and rfc822msgid: show the draft; in:sent and SENT do not."""
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        reply = reply_to(sandbox, original_id)
        draft_message = create_draft(api, reply, thread_id)["message"]["id"]

        thread = api.users().threads().get(
            userId="me", id=thread_id, format="metadata", metadataHeaders=["Message-ID"]
        ).execute()
        by_id = {m["id"]: m for m in thread["messages"]}
        assert set(by_id) == {original_id, draft_message}
        assert by_id[draft_message]["labelIds"] == ["DRAFT"]
        assert by_id[draft_message]["payload"]["headers"] == [
            {"name": "Message-ID", "value": reply["Message-ID"]}
        ]
        assert listed(api, "in:drafts") == {draft_message}
        assert listed(api, f"rfc822msgid:{reply['Message-ID'].strip('<>')}") == {draft_message}
        assert listed(api, "in:sent") == set()
        assert sandbox.gmail.sent_messages() == []

    def test_list_and_get_name_the_draft_and_its_message(self, sandbox: Sandbox, api: Any) -> None:
        """drafts.list gives {id, message: {id, threadId}}; drafts.get the message in a format."""
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        reply = reply_to(sandbox, original_id)
        draft = create_draft(api, reply, thread_id)

        listing = api.users().drafts().list(userId="me").execute()
        got = api.users().drafts().get(userId="me", id=draft["id"], format="raw").execute()

        ref = {"id": draft["message"]["id"], "threadId": thread_id}
        assert listing["drafts"] == [{"id": draft["id"], "message": ref}]
        assert got["id"] == draft["id"] and got["message"]["labelIds"] == ["DRAFT"]
        raw = base64.urlsafe_b64decode(got["message"]["raw"])
        assert reply["Message-ID"].encode() in raw
        with pytest.raises(HttpError) as missing:
            api.users().drafts().get(userId="me", id="r-1").execute()
        assert missing.value.resp.status == 404

    def test_sending_a_draft_replaces_it_with_a_sent_message_in_the_thread(
        self, sandbox: Sandbox, api: Any
    ) -> None:
        """drafts.send: the draft is gone, a new message (new id, SENT) is in its thread."""
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        reply = reply_to(sandbox, original_id)
        draft = create_draft(api, reply, thread_id)

        sent = api.users().drafts().send(userId="me", body={"id": draft["id"]}).execute()

        assert sent["id"] != draft["message"]["id"]
        assert sent["threadId"] == thread_id and sent["labelIds"] == ["SENT"]
        assert sandbox.gmail.drafts() == []
        [stored] = sandbox.gmail.sent_messages()
        assert stored.message["Message-ID"] == reply["Message-ID"]
        assert listed(api, "in:drafts") == set()

    def test_deleting_a_draft_removes_its_message(self, sandbox: Sandbox, api: Any) -> None:
        """drafts.delete answers 204 and the draft's message is gone from its thread."""
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        draft = create_draft(api, reply_to(sandbox, original_id), thread_id)

        api.users().drafts().delete(userId="me", id=draft["id"]).execute()

        assert sandbox.gmail.drafts() == []
        thread = api.users().threads().get(userId="me", id=thread_id).execute()
        assert [m["id"] for m in thread["messages"]] == [original_id]

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            pytest.param({}, "Missing draft message", id="no-message"),
            pytest.param({"message": {"threadId": "abc"}}, "Missing draft message", id="no-raw"),
            pytest.param({"message": {"raw": "eA", "colour": "red"}},
                         'Unknown name "colour" at \'message\'', id="unknown-field"),
        ],
    )
    def test_a_draft_request_gmail_would_refuse_is_refused(
        self, sandbox: Sandbox, api: Any, body: dict[str, Any], message: str
    ) -> None:
        """A draft without a message, without raw, or with a field Gmail lacks gets a 400."""
        with pytest.raises(HttpError) as refused:
            api.users().drafts().create(userId="me", body=body).execute()
        assert refused.value.resp.status == 400
        assert message in json.loads(refused.value.content)["error"]["message"]
        assert sandbox.gmail.drafts() == []

    def test_draft_calls_cost_their_quota_units(self, sandbox: Sandbox, api: Any) -> None:
        """create 10, list 5, get 5, send 100, delete 10 units, from Gmail's table."""
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        costs = []

        def cost(request: Any) -> Any:
            before = sandbox.gmail.units_used
            answer = request.execute()
            costs.append(sandbox.gmail.units_used - before)
            return answer

        drafts = api.users().drafts()
        first = cost(drafts.create(userId="me", body={"message": {
            "raw": encoded(reply_to(sandbox, original_id)), "threadId": thread_id}}))
        second = create_draft(api, reply_to(sandbox, original_id), thread_id)
        cost(drafts.list(userId="me"))
        cost(drafts.get(userId="me", id=first["id"]))
        cost(drafts.send(userId="me", body={"id": first["id"]}))
        cost(drafts.delete(userId="me", id=second["id"]))

        assert costs == [10, 5, 5, 100, 10]


class TestDraftMode:
    def test_one_draft_in_the_thread_to_the_sender_only_with_their_portal_link(
        self, sandbox: Sandbox
    ) -> None:
        """A billing email gets one draft in its thread, to the sender only, nothing sent."""
        draft_mode(sandbox)
        customer = sandbox.stripe.add_customer(CUSTOMER, name="Ada Lovelace")
        sandbox.stripe.add_customer("grace@example.com", name="Grace")
        raw = person_mail(CUSTOMER, "Where is my invoice?", "Hi!", name="Ada Lovelace",
                          extra_headers={"Reply-To": "attacker@evil.test",
                                         "Cc": "someone@else.test"})
        original_id, thread_id = sandbox.gmail.deliver(raw)
        original = sandbox.gmail.message(original_id).message

        result = sandbox.cli("once")

        assert result.code == 0, result.stderr
        [draft] = sandbox.gmail.drafts()
        message = draft.message.message
        assert draft.message.thread_id == thread_id
        assert draft.message.label_ids == {"DRAFT"}
        assert sandbox.gmail.sent_messages() == []
        assert not [r for r in sandbox.gmail.requests if r.path.endswith("/messages/send")]
        assert message["To"] == CUSTOMER
        assert message["Cc"] is None and message["Bcc"] is None
        assert message["Subject"] == "Re: Where is my invoice?"
        assert message["In-Reply-To"] == original["Message-ID"]
        assert message["Auto-Submitted"] == "auto-replied"
        [session] = sandbox.stripe.portal_sessions()
        assert session.customer == customer
        assert session.url in text_of(message)
        assert "Ada Lovelace" in text_of(message)
        assert "1 drafted" in result.stdout
        assert re.search(rf"^drafted\s+{original_id} to {CUSTOMER}", result.stdout, re.M)

    def test_the_original_is_labelled_drafted_not_replied_and_left_unread(
        self, sandbox: Sandbox
    ) -> None:
        """The drafted label (created at start) goes on the original; replied never does."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        original_id, _ = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))

        assert sandbox.cli("once").code == 0

        labels = sandbox.gmail.message_label_names(original_id)
        assert DRAFTED in labels and "UNREAD" in labels
        assert not {REPLIED, NEEDS_HUMAN} & labels
        with pytest.raises(KeyError):
            sandbox.gmail.label_id(REPLIED)  # only the labels draft mode uses are created
        entry = _ledger(sandbox).get(original_id)
        assert entry is not None and entry.state == DONE
        assert entry.sent_gmail_id == sandbox.gmail.drafts()[0].message.id

    def test_second_once_makes_no_second_draft(self, sandbox: Sandbox) -> None:
        """Running `once` again writes nothing to Gmail or Stripe: no second draft, no session."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice please", "?"))
        assert sandbox.cli("once").code == 0
        writes_before = (len(sandbox.gmail.writes()), len(sandbox.stripe.writes()))

        second = sandbox.cli("once")

        assert second.code == 0, second.stderr
        assert len(sandbox.gmail.drafts()) == 1
        assert len(sandbox.stripe.portal_sessions()) == 1
        assert (len(sandbox.gmail.writes()), len(sandbox.stripe.writes())) == writes_before

    def test_a_draft_the_person_deleted_or_sent_is_not_made_again(
        self, sandbox: Sandbox, api: Any
    ) -> None:
        """The draft is the reply: once a person deletes or sends it, no new draft follows."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        sandbox.stripe.add_customer("grace@example.com")
        first, _ = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        second, _ = sandbox.gmail.deliver(person_mail("grace@example.com", "Billing", "?"))
        assert sandbox.cli("once").code == 0
        by_thread = {d.message.message["To"]: d.id for d in sandbox.gmail.drafts()}
        api.users().drafts().delete(userId="me", id=by_thread[CUSTOMER]).execute()
        api.users().drafts().send(userId="me", body={"id": by_thread["grace@example.com"]}).execute()

        assert sandbox.cli("once").code == 0
        _ledger(sandbox).record_history_id(None)  # and a full search finds nothing either
        assert sandbox.cli("once").code == 0

        assert sandbox.gmail.drafts() == []
        assert [m.message["To"] for m in sandbox.gmail.sent_messages()] == ["grace@example.com"]
        assert len(sandbox.stripe.portal_sessions()) == 2
        for original in (first, second):
            assert DRAFTED in sandbox.gmail.message_label_names(original)

    def test_a_drafted_thread_is_not_listed_again_even_without_the_ledger(
        self, sandbox: Sandbox
    ) -> None:
        """The candidate search excludes the drafted label: a lost ledger drafts nothing twice."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        assert sandbox.cli("once").code == 0
        for suffix in ("", "-wal", "-shm"):
            (sandbox.folder / f"state.db{suffix}").unlink(missing_ok=True)
        # Back to sending: a thread drafted earlier keeps its one reply, whatever the mode.
        text = sandbox.config_path.read_text(encoding="utf-8")
        sandbox.config_path.write_text(text.replace('mode = "draft"\n', ""))

        result = sandbox.cli("once")

        assert result.code == 0, result.stderr
        searches = [r.param("q") or "" for r in sandbox.gmail.requests
                    if r.path == "/gmail/v1/users/me/messages"]
        assert all("-label:billing-responder-drafted" in q for q in searches), searches
        assert len(sandbox.gmail.drafts()) == 1
        assert sandbox.gmail.sent_messages() == []
        assert "0 messages" in result.stdout

    def test_after_a_drafting_cycle_the_next_polls_history_not_a_full_search(
        self, sandbox: Sandbox
    ) -> None:
        """A drafted message is finished, not left for later: the next cycle is one history call."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        assert sandbox.cli("once").code == 0
        sandbox.gmail.clear_requests()

        assert sandbox.cli("once").code == 0

        paths = [r.path for r in sandbox.gmail.requests if r.method == "GET"]
        assert "/gmail/v1/users/me/history" in paths
        assert "/gmail/v1/users/me/messages" not in paths

    def test_the_same_senders_next_email_within_per_sender_hours_is_held_back(
        self, sandbox: Sandbox
    ) -> None:
        """A draft counts as the reply for the per-sender limit: the next email gets no draft."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        assert sandbox.cli("once").code == 0
        later_id, _ = sandbox.gmail.deliver(person_mail(CUSTOMER, "Billing again", "?"))

        result = sandbox.cli("once")

        assert result.code == 0, result.stderr
        assert len(sandbox.gmail.drafts()) == 1
        assert len(sandbox.stripe.portal_sessions()) == 1
        assert re.search(rf"^skipped\s+{later_id}.*per_sender_hours", result.stdout, re.M)
        assert DRAFTED not in sandbox.gmail.message_label_names(later_id)

    def test_dry_run_says_would_draft_and_makes_nothing(self, sandbox: Sandbox) -> None:
        """A dry run in draft mode shows the reply as "would draft"; no draft, label or session."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))

        result = sandbox.cli("once", "--dry-run")

        assert result.code == 0, result.stderr
        assert "WOULD DRAFT" in result.stdout
        assert f"Reply to: {CUSTOMER}" in result.stdout
        assert "1 would draft" in result.stdout
        assert sandbox.gmail.writes() == []
        assert sandbox.stripe.portal_sessions() == []

    def test_send_mode_makes_no_drafts(self, sandbox: Sandbox) -> None:
        """The default mode sends the reply and never calls drafts.create."""
        sandbox.stripe.add_customer(CUSTOMER)
        sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))

        result = sandbox.cli("once")

        assert result.code == 0, result.stderr
        assert len(sandbox.gmail.sent_messages()) == 1
        assert sandbox.gmail.drafts() == []
        assert not [r for r in sandbox.gmail.requests if "/drafts" in r.path]
        assert "1 replied" in result.stdout


class TestDraftFaults:
    def test_a_lost_answer_to_drafts_create_ends_in_exactly_one_draft(
        self, sandbox: Sandbox
    ) -> None:
        """Gmail made the draft but the connection dropped: never re-posted; found; one draft."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        sandbox.gmail.inject_fault(
            Fault(500, method="POST", path=DRAFTS_CREATE, after=True, drop=True)
        )

        first = sandbox.cli("once")

        assert first.code == 0, first.stderr
        creates = [r for r in sandbox.gmail.requests if re.search(DRAFTS_CREATE, r.path)]
        assert len(creates) == 1  # not retried: a second POST could make a second draft
        assert len(sandbox.gmail.drafts()) == 1
        entry = _ledger(sandbox).get(original_id)
        assert entry is not None and entry.state == SENDING
        assert "1 deferred" in first.stdout
        _time_passes(sandbox, 60)

        second = sandbox.cli("once")

        assert second.code == 0, second.stderr
        [draft] = sandbox.gmail.drafts()
        assert draft.message.thread_id == thread_id
        assert draft.message.message["Message-ID"] == entry.reply_message_id
        assert len([r for r in sandbox.gmail.requests if re.search(DRAFTS_CREATE, r.path)]) == 1
        assert len(sandbox.stripe.portal_sessions()) == 1
        assert DRAFTED in sandbox.gmail.message_label_names(original_id)
        done = _ledger(sandbox).get(original_id)
        assert done is not None and done.state == DONE
        assert done.sent_gmail_id == draft.message.id
        assert "1 drafted" in second.stdout

    def test_a_5xx_on_drafts_create_defers_and_one_draft_follows(self, sandbox: Sandbox) -> None:
        """A 503 before Gmail made anything: deferred, then one draft with the same session."""
        draft_mode(sandbox)
        sandbox.stripe.add_customer(CUSTOMER)
        original_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(503, method="POST", path=DRAFTS_CREATE))

        first = sandbox.cli("once")

        assert first.code == 0, first.stderr
        assert "1 deferred" in first.stdout
        assert sandbox.gmail.drafts() == []
        assert DRAFTED not in sandbox.gmail.message_label_names(original_id)
        _time_passes(sandbox, 60)

        second = sandbox.cli("once")

        assert second.code == 0, second.stderr
        [draft] = sandbox.gmail.drafts()
        assert draft.message.thread_id == thread_id
        [session] = sandbox.stripe.portal_sessions()
        assert session.url in text_of(draft.message.message)
        assert DRAFTED in sandbox.gmail.message_label_names(original_id)
        assert sandbox.gmail.sent_messages() == []
