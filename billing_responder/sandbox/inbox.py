"""A realistic support inbox and Stripe account, for `billing-responder demo` and the tests.

Each seeded message says what a correct responder does with it, so the demo can show it and the
end-to-end tests can hold the pipeline to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from billing_responder.sandbox.gmail import GmailEmulator
from billing_responder.sandbox.stripe import StripeEmulator

MAILBOX = "support@acme-saas.test"
# What Gmail's receiving server stamps on mail that passed SPF, DKIM and DMARC.
AUTHENTICATED = (
    "mx.google.com; dkim=pass header.i=@{domain}; spf=pass smtp.mailfrom={domain}; "
    "dmarc=pass header.from={domain}"
)


@dataclass(frozen=True)
class Seeded:
    """One seeded message and what should become of it."""

    gmail_id: str
    thread_id: str
    sender: str
    subject: str
    expected: str  # "reply", "escalate", "skip" or "untouched" (not even a candidate)
    why: str


def person_mail(
    sender: str,
    subject: str,
    body: str,
    *,
    name: str = "",
    extra_headers: dict[str, str] | None = None,
    received: datetime | None = None,
) -> bytes:
    """A plain message as a person's mail client sends it, stamped as Gmail would on arrival."""
    domain = sender.rpartition("@")[2]
    message = EmailMessage()
    message["Authentication-Results"] = AUTHENTICATED.format(domain=domain)
    message["From"] = f"{name} <{sender}>" if name else sender
    message["To"] = MAILBOX
    message["Subject"] = subject
    message["Date"] = format_datetime(received or datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain=domain)
    for key, value in (extra_headers or {}).items():
        message[key] = value
    message.set_content(body)
    return bytes(message)


def _bounce(subject_of_original: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Mail Delivery System <MAILER-DAEMON@mail.acme-saas.test>"
    message["To"] = MAILBOX
    message["Subject"] = f"Undelivered Mail Returned to Sender: {subject_of_original}"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="mail.acme-saas.test")
    message["Auto-Submitted"] = "auto-replied"
    message.set_content(
        "This is the mail system at host mail.acme-saas.test.\n\n"
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients.\n\n"
        "<gone@example.org>: host mx.example.org said: 550 5.1.1 User unknown\n"
    )
    status = EmailMessage()
    status.set_content(
        "Reporting-MTA: dns; mail.acme-saas.test\n\n"
        "Final-Recipient: rfc822; gone@example.org\nAction: failed\nStatus: 5.1.1\n"
    )
    message.make_mixed()
    message.attach(status)
    message.replace_header("Content-Type", 'multipart/report; report-type=delivery-status')
    message.set_boundary("bounce-boundary-1")
    return bytes(message)


def seed(gmail: GmailEmulator, stripe: StripeEmulator) -> list[Seeded]:
    """Fill the emulators with the demo inbox and Stripe account; return the seeded messages."""
    now = int(time.time())
    day = 86_400
    stripe.add_customer("ada@example.com", name="Ada Lovelace", created=now - 400 * day,
                        subscription_statuses=["active"])
    # Grace has two records: an old one whose subscription was cancelled, and the live one.
    stripe.add_customer("grace@example.net", name="Grace Hopper (old account)",
                        created=now - 900 * day, subscription_statuses=["canceled"])
    stripe.add_customer("grace@example.net", name="Grace Hopper", created=now - 30 * day,
                        subscription_statuses=["active"])
    stripe.add_customer("bob@example.org", name="Bob Example", created=now - 200 * day,
                        subscription_statuses=["past_due"])
    stripe.add_customer("jose@example.es", name="José Núñez", created=now - 100 * day,
                        subscription_statuses=["trialing"])

    seeded: list[Seeded] = []

    def add(raw: bytes, sender: str, subject: str, expected: str, why: str) -> None:
        gmail_id, thread_id = gmail.deliver(raw)
        seeded.append(Seeded(gmail_id, thread_id, sender, subject, expected, why))

    add(person_mail("ada@example.com", "Where is my invoice for March?",
                    "Hi, I can't find my March invoice. Could you send it again?\nAda",
                    name="Ada Lovelace"),
        "ada@example.com", "Where is my invoice for March?", "reply",
        "a customer with an active subscription asks for an invoice")
    add(person_mail("grace@example.net", "Billing: please update my card",
                    "My card expired, how do I change it?\nGrace", name="Grace Hopper"),
        "grace@example.net", "Billing: please update my card", "reply",
        "two Stripe records share this address; the one with the live subscription is used")
    add(person_mail("Bob@Example.org", "Invoice question",
                    "Why was my last invoice higher than usual?", name="Bob"),
        "Bob@Example.org", "Invoice question", "reply",
        "Stripe has bob@example.org: the lookup ignores case")
    add(person_mail("jose@example.es", "=?UTF-8?B?wr9Ew7NuZGUgZXN0w6EgbWkgaW52b2ljZT8=?=",
                    "Hola, no encuentro mi factura.", name="José"),
        "jose@example.es", "¿Dónde está mi invoice?", "reply",
        "an RFC 2047 encoded subject is decoded before matching")
    add(person_mail("stranger@unknown.test", "Billing problem",
                    "I was charged twice!", name="Stranger"),
        "stranger@unknown.test", "Billing problem", "escalate",
        "no Stripe customer has this address: a person must look")
    add(person_mail("ada@example.com", "Lunch on Friday?", "Are you free?", name="Ada Lovelace"),
        "ada@example.com", "Lunch on Friday?", "untouched",
        "not about billing: the Gmail search never returns it")
    add(_bounce("Your invoice INV-0042"),
        "MAILER-DAEMON@mail.acme-saas.test",
        "Undelivered Mail Returned to Sender: Your invoice INV-0042", "skip",
        "a bounce (multipart/report from MAILER-DAEMON): never answer a robot")
    add(person_mail("bob@example.org", "Automatic reply: Your invoice INV-0043",
                    "I am out of the office until Monday.",
                    extra_headers={"Auto-Submitted": "auto-replied", "X-Autoreply": "yes"}),
        "bob@example.org", "Automatic reply: Your invoice INV-0043", "skip",
        "an out-of-office auto-reply from a paying customer: answering would start a loop")
    add(person_mail("news@billing-tips.test", "Billing tips for November",
                    "Ten ways to get paid faster.",
                    extra_headers={"List-Unsubscribe": "<mailto:unsub@billing-tips.test>",
                                   "List-Id": "Billing tips <tips.billing-tips.test>",
                                   "Precedence": "bulk"}),
        "news@billing-tips.test", "Billing tips for November", "skip",
        "a newsletter (List-Id, List-Unsubscribe, Precedence: bulk)")
    return seeded
