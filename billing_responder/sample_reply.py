"""`billing-responder test-reply`: send one real sample reply, as a customer would get it.

Stripe's advice before launching is to try the portal from the customer's side. This sends the
owner exactly what a customer gets: the real templates, rendered with the real customer's name,
and a real portal link for that customer, through the real mailbox. What differs, on purpose:

* it goes to ``--to`` alone, in a new conversation (there is no customer email to answer), with
  the subject :data:`TEST_SUBJECT` and ``Auto-Submitted: auto-generated`` (RFC 3834: not a reply,
  and no robot should answer it; the responder itself never answers mail from its own mailbox);
* the portal session's idempotency key is new on every invocation, so each test mints its own
  session instead of replaying an earlier one;
* nothing is recorded in the ledger: it holds what happened to received mail, and the limits
  count replies from it, so a test must not use up a customer's reply allowance.

The portal URL is a credential: it goes into the email and nowhere else (only the session id is
printed).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from email.message import EmailMessage
from typing import TextIO

from billing_responder import mail
from billing_responder.config import Config, stripe_api_key
from billing_responder.errors import UsageError
from billing_responder.gmail import GmailMailbox, load_credentials
from billing_responder.model import IncomingMessage
from billing_responder.render import ReplyContext, ReplyRenderer
from billing_responder.service import open_billing

TEST_SUBJECT = "Test: your billing portal link (billing-responder test-reply)"
#: What the templates see as the customer's subject; a plausible one, marked as a sample.
SAMPLE_ORIGINAL_SUBJECT = "Where can I find my invoices? (sample)"
_CUSTOMER_ID = re.compile(r"cus_[A-Za-z0-9_]+")
_NOTHING_TO_ANSWER = IncomingMessage(id="", thread_id="", label_ids=frozenset(), headers=())


def run_test_reply(config: Config, *, to: str, customer_id: str, out: TextIO) -> int:
    """Send a sample reply with a real portal link for ``customer_id`` to ``to``; the exit code."""
    recipient = parse_recipient(to)
    check_customer_id(customer_id)
    api_key = stripe_api_key(config)
    renderer = ReplyRenderer(config.reply.templates_dir, config_path=str(config.path))
    renderer.check()  # a broken template must stop us before a portal session is minted
    with contextlib.ExitStack() as stack:
        mailbox = GmailMailbox(config.gmail, load_credentials(config.gmail))
        stack.callback(mailbox.close)
        stack.callback(mailbox.persist_refreshed_token)
        billing = open_billing(config, api_key)
        stack.callback(billing.close)

        address = mailbox.address()
        customer = billing.customer(customer_id)
        session = billing.create_portal_session(
            customer.id, idempotency_key=f"billing-responder-test-reply-{uuid.uuid4().hex}"
        )
        rendered = renderer.render(
            ReplyContext(
                customer_name=customer.name or "",
                portal_url=session.url,
                original_subject=SAMPLE_ORIGINAL_SUBJECT,
                signature=config.reply.signature,
            )
        )
        message = compose_test_message(
            from_address=address,
            from_name=config.reply.from_name,
            to=recipient,
            text=rendered.text,
            html=rendered.html,
        )
        sent_id = mailbox.send(bytes(message), None)

    print(f"Sent a test reply to {recipient} (Gmail message {sent_id}).", file=out)
    print(f"  From:     {message['From']}", file=out)
    print(f"  Subject:  {message['Subject']}", file=out)
    whose = f"{customer.name} <{customer.email}>" if customer.name else customer.email or "-"
    print(f"  Portal:   session {session.id} for {customer.id} ({whose})", file=out)
    print(
        "The link opens that customer's billing portal for a short while: whoever has it can "
        "act as the customer, so do not forward it.",
        file=out,
    )
    if customer.email and not mail.same_address(customer.email, recipient):
        print(
            f"Note: {recipient} is not the customer's address ({customer.email}); that is "
            "expected for a test, and the link still opens this customer's portal.",
            file=out,
        )
    return 0


def parse_recipient(to: str) -> str:
    """The one plain address in ``--to``; anything else is a usage error (exit 2)."""
    found = mail.mailboxes(to)
    if not found or len(found) != 1:
        raise UsageError(f"--to {to!r} is not one email address")
    address = found[0].addr_spec
    try:
        mail.reply_message_id_domain(address)  # the same test build_reply applies, made early
    except ValueError:
        raise UsageError(f"--to {to!r} is not a plain ASCII email address") from None
    return address


def check_customer_id(customer_id: str) -> None:
    """Refuse what cannot be a Stripe customer id before asking Stripe (exit 2)."""
    if not _CUSTOMER_ID.fullmatch(customer_id):
        raise UsageError(f"--customer {customer_id!r} is not a Stripe customer id (cus_...)")


def compose_test_message(
    *, from_address: str, from_name: str, to: str, text: str, html: str
) -> EmailMessage:
    """The sample reply as a new message: a reply's body and headers, no thread, test subject.

    Built by :func:`mail.build_reply` (so it is the reply customers get, header for header) from
    an empty original; then the subject is the test's and ``Auto-Submitted`` says
    ``auto-generated``, RFC 3834's value for automatic mail that answers nothing.
    """
    message, _ = mail.build_reply(
        _NOTHING_TO_ANSWER,
        from_address=from_address,
        from_name=from_name or None,
        to=to,
        subject=TEST_SUBJECT,
        text=text,
        html=html,
        message_id_domain=mail.reply_message_id_domain(from_address),
    )
    message.replace_header("Subject", TEST_SUBJECT)
    message.replace_header("Auto-Submitted", "auto-generated")
    return message
