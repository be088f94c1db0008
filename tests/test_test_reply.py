"""`billing-responder test-reply`: one real sample reply, through the real clients and emulators.

What must hold: exactly one message, to ``--to`` alone, in a new conversation, carrying a portal
link minted for ``--customer`` (and no one else); the link appears in the email and nowhere
else; a mistake costs nothing (no session minted, nothing sent) and says so in one line.
"""

from __future__ import annotations

import pytest

from billing_responder.sample_reply import TEST_SUBJECT
from tests.conftest import CliResult, Sandbox, html_of, text_of

OWNER = "owner@acme-saas.test"


@pytest.fixture
def customer(sandbox: Sandbox) -> str:
    """A customer with a name that must be escaped in HTML."""
    return sandbox.stripe.add_customer(
        "ada@customer.test", name="Ada <Lovelace>", subscription_statuses=["active"]
    )


def send_test_reply(sandbox: Sandbox, *args: str) -> CliResult:
    """Run `test-reply` with ``args``."""
    return sandbox.cli("test-reply", *args)


def assert_nothing_done(sandbox: Sandbox) -> None:
    """No portal session minted, nothing sent or written in Gmail or Stripe."""
    assert sandbox.stripe.portal_sessions() == []
    assert sandbox.stripe.writes() == []
    assert sandbox.gmail.writes() == []
    assert sandbox.gmail.sent_messages() == []


class TestSampleReply:
    def test_one_message_to_the_given_address_with_that_customers_portal_link(
        self, sandbox: Sandbox, customer: str
    ) -> None:
        """One message goes to --to alone, carrying the URL of a session minted for --customer."""
        result = send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        assert result.code == 0, result.stderr
        sent = sandbox.gmail.sent_messages()
        assert len(sent) == 1
        message = sent[0].message
        assert message["To"] == OWNER
        assert message["Cc"] is None and message["Bcc"] is None
        sessions = sandbox.stripe.portal_sessions()
        assert len(sessions) == 1
        assert sessions[0].customer == customer
        assert sessions[0].return_url == "https://acme-saas.test/account"
        assert sessions[0].url in text_of(message)
        assert sessions[0].url in html_of(message)

    def test_message_is_the_customer_reply_marked_as_a_test(
        self, sandbox: Sandbox, customer: str
    ) -> None:
        """From the mailbox, the test subject, auto-generated, the customer's name escaped."""
        send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        message = sandbox.gmail.sent_messages()[0].message
        assert message["Subject"] == TEST_SUBJECT
        assert str(message["From"]) == f"Acme Support <{sandbox.gmail.address}>"
        assert message["Auto-Submitted"] == "auto-generated"
        assert message["In-Reply-To"] is None and message["References"] is None
        assert "Hello Ada <Lovelace>," in text_of(message)
        assert "Hello Ada &lt;Lovelace&gt;," in html_of(message)
        assert "The Acme support team" in text_of(message)

    def test_sent_as_a_new_conversation(self, sandbox: Sandbox, customer: str) -> None:
        """The send names no thread, and the message starts its own conversation."""
        send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        (send,) = sandbox.gmail.writes()
        assert "threadId" not in send.json()
        sent = sandbox.gmail.sent_messages()[0]
        assert sent.thread_id == sent.id

    def test_stdout_names_the_session_and_message_but_never_the_url(
        self, sandbox: Sandbox, customer: str
    ) -> None:
        """What was sent is printed (recipient, subject, ids), the portal URL is not."""
        result = send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        session = sandbox.stripe.portal_sessions()[0]
        sent = sandbox.gmail.sent_messages()[0]
        assert OWNER in result.stdout
        assert TEST_SUBJECT in result.stdout
        assert sent.id in result.stdout
        assert session.id in result.stdout and customer in result.stdout
        assert session.url not in result.stdout + result.stderr
        assert "/p/session/" not in result.stdout + result.stderr

    def test_each_invocation_mints_its_own_session(self, sandbox: Sandbox, customer: str) -> None:
        """Two runs mint two sessions under two idempotency keys: no replay of the first link."""
        send_test_reply(sandbox, "--to", OWNER, "--customer", customer)
        send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        sessions = sandbox.stripe.portal_sessions()
        assert len(sessions) == 2
        keys = {s.idempotency_key for s in sessions}
        assert len(keys) == 2 and None not in keys
        assert sessions[0].url != sessions[1].url

    def test_nothing_is_recorded_in_the_ledger(self, sandbox: Sandbox, customer: str) -> None:
        """A test reply is no handled message: the ledger is not even created."""
        send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        assert not (sandbox.folder / "state.db").exists()

    def test_says_whose_portal_when_sent_to_someone_else(
        self, sandbox: Sandbox, customer: str
    ) -> None:
        """--to another address than the customer's: a note says whose portal the link opens."""
        result = send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        assert "Note: owner@acme-saas.test is not the customer's address" in result.stdout
        assert "ada@customer.test" in result.stdout

    def test_no_note_when_sent_to_the_customer_itself(
        self, sandbox: Sandbox, customer: str
    ) -> None:
        """--to the customer's own address (any case): no note, and the message goes there."""
        result = send_test_reply(sandbox, "--to", "ADA@customer.test", "--customer", customer)

        assert result.code == 0, result.stderr
        assert "Note:" not in result.stdout
        assert sandbox.gmail.sent_messages()[0].message["To"] == "ADA@customer.test"

    def test_display_name_form_of_the_recipient_is_accepted(
        self, sandbox: Sandbox, customer: str
    ) -> None:
        """--to 'Name <address>' sends to the address."""
        result = send_test_reply(sandbox, "--to", f"The Owner <{OWNER}>", "--customer", customer)

        assert result.code == 0, result.stderr
        assert sandbox.gmail.sent_messages()[0].message["To"] == OWNER


class TestMistakes:
    def test_unknown_customer_exits_1_with_stripes_message_and_does_nothing(
        self, sandbox: Sandbox
    ) -> None:
        """A cus_ id Stripe does not know: exit 1, Stripe's message in one line, nothing sent."""
        result = send_test_reply(sandbox, "--to", OWNER, "--customer", "cus_1NoSuchCustomer0")

        assert result.code == 1
        assert result.stderr.splitlines() == [
            "billing-responder: Stripe: No such customer: 'cus_1NoSuchCustomer0'"
        ]
        assert result.stdout == ""
        assert_nothing_done(sandbox)

    @pytest.mark.parametrize(
        "to", ["owner", "owner@", "a@acme-saas.test, b@acme-saas.test", "ówner@acme-saas.test", ""]
    )
    def test_bad_recipient_exits_2_before_contacting_anything(
        self, sandbox: Sandbox, customer: str, to: str
    ) -> None:
        """--to that is not one plain address: exit 2, one line, no request to either service."""
        result = send_test_reply(sandbox, "--to", to, "--customer", customer)

        assert result.code == 2
        assert len(result.stderr.splitlines()) == 1
        assert "--to" in result.stderr
        assert sandbox.gmail.requests == [] and sandbox.stripe.requests == []

    @pytest.mark.parametrize("customer_id", ["ada@customer.test", "cus_", "cus_../v1/x", "sub_1"])
    def test_what_cannot_be_a_customer_id_exits_2(
        self, sandbox: Sandbox, customer_id: str
    ) -> None:
        """--customer that is no cus_ id: exit 2, one line, no request to either service."""
        result = send_test_reply(sandbox, "--to", OWNER, "--customer", customer_id)

        assert result.code == 2
        assert len(result.stderr.splitlines()) == 1
        assert "--customer" in result.stderr
        assert sandbox.gmail.requests == [] and sandbox.stripe.requests == []

    def test_revoked_gmail_mints_no_session(self, sandbox: Sandbox, customer: str) -> None:
        """Gmail refusing the credentials stops the test before a portal session is minted."""
        sandbox.gmail.revoke()

        result = send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        assert result.code == 3
        assert "billing-responder auth" in result.stderr
        assert_nothing_done(sandbox)

    def test_broken_template_mints_no_session(self, sandbox: Sandbox, customer: str) -> None:
        """A template that does not render stops the test before anything is minted or sent."""
        folder = sandbox.folder / "templates"
        folder.mkdir()
        (folder / "reply.txt.j2").write_text("{{ missing_variable }}", encoding="utf-8")
        (folder / "reply.html.j2").write_text("{{ portal_url }}", encoding="utf-8")
        text = sandbox.config_path.read_text(encoding="utf-8")
        sandbox.config_path.write_text(
            text.replace("[reply]\n", '[reply]\ntemplates_dir = "templates"\n'), encoding="utf-8"
        )

        result = send_test_reply(sandbox, "--to", OWNER, "--customer", customer)

        assert result.code == 2
        assert "missing_variable" in result.stderr
        assert_nothing_done(sandbox)
