"""Spoofing: a portal link reaches only the customer it belongs to (issue 4).

Every case goes through the sandbox: the real Gmail and Stripe clients against the emulators, and
the assertions are on what the emulators recorded. The victim is a paying Stripe customer; the
attacker controls evil.test (its DNS too, so its own mail authenticates) and wants the victim's
billing portal.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from email.message import EmailMessage

import pytest

from billing_responder.sandbox.inbox import MAILBOX
from tests.conftest import Sandbox

VICTIM = "ceo@customer.example"
ATTACKER = "attacker@evil.test"
NEEDS_HUMAN = "billing-responder/needs-human"
REPLIED = "billing-responder/replied"

GMAIL_FAILS_DMARC = (
    "mx.google.com; dkim=none; spf=pass smtp.mailfrom=evil.test;"
    " dmarc=fail (p=REJECT sp=REJECT dis=NONE) header.from=customer.example"
)
GMAIL_PASSES_VICTIM = (
    "mx.google.com; dkim=pass header.i=@customer.example; spf=pass"
    " smtp.mailfrom=customer.example; dmarc=pass (p=REJECT) header.from=customer.example"
)
GMAIL_PASSES_ATTACKER = (
    "mx.google.com; dkim=pass header.i=@evil.test; spf=pass smtp.mailfrom=evil.test;"
    " dmarc=pass (p=NONE) header.from=evil.test"
)


def mail(*headers: tuple[str, str], subject: str = "Where is my invoice?") -> bytes:
    """A billing question with exactly ``headers`` (in order) above Subject, Date and Message-ID."""
    lines = [f"{name}: {value}" for name, value in headers]
    lines += [
        f"To: {MAILBOX}",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: {email.utils.make_msgid(domain='customer.example')}",
        "Content-Type: text/plain; charset=utf-8",
    ]
    return ("\r\n".join(lines) + "\r\n\r\nPlease send me the billing link.\r\n").encode()


@dataclass(frozen=True)
class Spoof:
    """One forged message and the reason the escalation must give."""

    raw: bytes
    reason: str


SPOOFS = {
    "dmarc-fail": Spoof(
        mail(
            ("Authentication-Results", GMAIL_FAILS_DMARC),
            ("From", f"CEO <{VICTIM}>"),
            ("Reply-To", ATTACKER),
        ),
        "mx.google.com reports dmarc=fail for customer.example",
    ),
    "no-authentication-results": Spoof(
        mail(("From", f"CEO <{VICTIM}>"), ("Reply-To", ATTACKER)),
        "no Authentication-Results header from mx.google.com",
    ),
    "forged-pass-below-the-real-header": Spoof(
        mail(
            ("Authentication-Results", GMAIL_FAILS_DMARC),
            ("Authentication-Results", GMAIL_PASSES_VICTIM),
            ("From", f"CEO <{VICTIM}>"),
            ("Reply-To", ATTACKER),
        ),
        "mx.google.com reports dmarc=fail for customer.example",
    ),
    "pass-from-a-foreign-authserv-id": Spoof(
        mail(
            ("Authentication-Results", GMAIL_PASSES_VICTIM.replace("mx.google.com", "mx.evil.test")),
            ("From", f"CEO <{VICTIM}>"),
            ("Reply-To", ATTACKER),
        ),
        "no Authentication-Results header from mx.google.com",
    ),
    "spf-pass-for-an-unaligned-domain": Spoof(
        mail(
            (
                "Authentication-Results",
                "mx.google.com; dkim=pass header.d=evil.test; spf=pass"
                " smtp.mailfrom=bounce@evil.test; dmarc=none header.from=customer.example",
            ),
            ("From", f"CEO <{VICTIM}>"),
            ("Reply-To", ATTACKER),
        ),
        "no DMARC policy for customer.example and no dkim or spf pass aligned with it",
    ),
    "two-from-addresses": Spoof(
        mail(
            ("Authentication-Results", GMAIL_PASSES_ATTACKER),
            ("From", f"{ATTACKER}, {VICTIM}"),
        ),
        "From names 2 addresses",
    ),
    "two-from-headers": Spoof(
        mail(
            ("Authentication-Results", GMAIL_PASSES_ATTACKER),
            ("From", ATTACKER),
            ("From", VICTIM),
        ),
        "From headers",
    ),
    "group-syntax": Spoof(
        mail(
            ("Authentication-Results", GMAIL_PASSES_VICTIM),
            ("From", f"Billing: {VICTIM}, {ATTACKER};"),
        ),
        "group syntax",
    ),
    "victim-address-as-display-name": Spoof(
        mail(
            ("Authentication-Results", GMAIL_PASSES_ATTACKER),
            ("From", f'"{VICTIM}" <{ATTACKER}>'),
        ),
        "no Stripe customer has this sender's address",
    ),
    # Gmail hands the display name back decoded and unquoted, "ceo@customer.example <attacker@...>",
    # which Python's parser would read as the victim's address alone.
    "victim-address-as-encoded-display-name": Spoof(
        mail(
            ("Authentication-Results", GMAIL_PASSES_ATTACKER),
            ("From", f"=?UTF-8?Q?{VICTIM.replace('@', '=40')}?= <{ATTACKER}>"),
        ),
        "From does not parse strictly",
    ),
    "victim-address-as-unquoted-display-name": Spoof(
        mail(
            ("Authentication-Results", GMAIL_PASSES_ATTACKER),
            ("From", f"{VICTIM} <{ATTACKER}>"),
        ),
        "From does not parse strictly",
    ),
    "victim-in-sender-header": Spoof(
        mail(
            ("Authentication-Results", GMAIL_PASSES_ATTACKER),
            ("From", ATTACKER),
            ("Sender", VICTIM),
            ("Reply-To", VICTIM),
        ),
        "no Stripe customer has this sender's address",
    ),
}


def recipients(message: EmailMessage) -> list[str]:
    """Every address a sent message was addressed to (To, Cc, Bcc), lower-cased."""
    values = [str(v) for name in ("To", "Cc", "Bcc") for v in message.get_all(name) or []]
    return [address.lower() for _, address in email.utils.getaddresses(values)]


class TestSpoofedMailGetsNoLink:
    @pytest.mark.parametrize("case", list(SPOOFS), ids=list(SPOOFS))
    def test_spoof_is_escalated_and_nobody_gets_a_portal(self, sandbox: Sandbox, case: str) -> None:
        """No portal session for the victim, nothing sent, the thread labelled needs-human with the reason."""
        spoof = SPOOFS[case]
        sandbox.stripe.add_customer(VICTIM, name="The CEO", subscription_statuses=["active"])
        gmail_id, thread_id = sandbox.gmail.deliver(spoof.raw)

        result = sandbox.cli("once")

        assert result.code == 0, result.stderr
        assert sandbox.stripe.portal_sessions() == []
        assert sandbox.gmail.sent_messages() == []
        labels = sandbox.gmail.thread_label_names(thread_id)
        assert NEEDS_HUMAN in labels and REPLIED not in labels
        line = next(line for line in result.stdout.splitlines() if gmail_id in line)
        assert line.startswith("escalated"), result.stdout
        assert spoof.reason in line

    @pytest.mark.parametrize("case", list(SPOOFS), ids=list(SPOOFS))
    def test_spoof_never_looks_up_the_victim(self, sandbox: Sandbox, case: str) -> None:
        """Stripe is never asked about the victim's address: the lookup is for the authenticated sender only."""
        sandbox.stripe.add_customer(VICTIM, subscription_statuses=["active"])
        sandbox.gmail.deliver(SPOOFS[case].raw)

        assert sandbox.cli("once").code == 0

        asked = [r for r in sandbox.stripe.requests if r.path.startswith("/v1/customers")]
        victim = VICTIM.encode()
        assert not any(
            victim in (r.path + str(r.query)).encode() + r.body for r in asked
        ), [(r.path, r.query) for r in asked]


class TestTheReplyGoesToTheAuthenticatedFromOnly:
    def test_reply_to_cc_and_sender_are_ignored(self, sandbox: Sandbox) -> None:
        """An authenticated customer's mail with Reply-To, Cc and Sender elsewhere: one reply, to From only."""
        victim_id = sandbox.stripe.add_customer(
            VICTIM, name="The CEO", subscription_statuses=["active"]
        )
        _, thread_id = sandbox.gmail.deliver(mail(
            ("Authentication-Results", GMAIL_PASSES_VICTIM),
            ("From", f"CEO <{VICTIM}>"),
            ("Reply-To", f"Accounts <{ATTACKER}>"),
            ("Cc", f"someone-else@evil.test, {ATTACKER}"),
            ("Sender", ATTACKER),
        ))

        assert sandbox.cli("once").code == 0

        sent = sandbox.gmail.sent_messages()
        assert len(sent) == 1
        assert recipients(sent[0].message) == [VICTIM]
        assert b"evil.test" not in sent[0].raw
        sessions = sandbox.stripe.portal_sessions()
        assert len(sessions) == 1
        assert sessions[0].customer == victim_id
        assert sent[0].thread_id == thread_id
        assert REPLIED in sandbox.gmail.thread_label_names(thread_id)

    def test_stripe_record_with_another_address_is_not_used(self, sandbox: Sandbox) -> None:
        """A customer whose Stripe email only resembles the sender (dots, plus tag) is not the sender's."""
        sandbox.stripe.add_customer("c.e.o@customer.example", subscription_statuses=["active"])
        sandbox.stripe.add_customer("ceo+billing@customer.example", subscription_statuses=["active"])
        sandbox.gmail.deliver(mail(
            ("Authentication-Results", GMAIL_PASSES_VICTIM), ("From", VICTIM)
        ))

        result = sandbox.cli("once")

        assert result.code == 0
        assert sandbox.stripe.portal_sessions() == []
        assert sandbox.gmail.sent_messages() == []
        assert "no Stripe customer has this sender's address" in result.stdout
