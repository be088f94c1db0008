"""Issue 4: nothing a sender writes in a Subject or a From can add a header to our reply or
redirect it, end to end through the real clients and the emulators, and at build_reply's level.

Hostile messages are written byte by byte, as a mail server could hand them to Gmail. What each
trick becomes on the way matters, and the cases cover every way:

- a bare CR or LF inside a header line ends the line (the Gmail emulator parses as Python's
  ``email`` does), so the "injected" header is simply a header of the *incoming* message, which
  the reply must not copy;
- a line break followed by white space is folding: the "header" after it is text of the value;
- an encoded word (RFC 2047) holding CR/LF, NUL or other controls is decoded by Gmail, so the
  value the responder fetches really contains them: this is the case the sanitising exists for.

Every case also has a Stripe customer named ``<script>alert(1)</script>``, so the HTML part is
checked for escaping, and an ordinary message from another customer answered in the same run,
whose reply gives the header names every reply must have.
"""

from __future__ import annotations

import base64
import email
import email.policy
import functools
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_responder.mail import (
    MAX_SUBJECT_CHARS,
    build_reply,
    decode_header_value,
    header_text,
    reply_subject,
)
from billing_responder.model import IncomingMessage
from billing_responder.sandbox.inbox import AUTHENTICATED, MAILBOX, person_mail
from tests.conftest import Sandbox

CUSTOMER = "ada@example.com"
COLLEAGUE = "boss@example.com"
EVIL = "x@evil.test"
HOSTILE_NAME = "<script>alert(1)</script>"
ESCAPED_NAME = "&lt;script&gt;alert(1)&lt;/script&gt;"
ORDINARY = "grace@example.net"

# RFC 5322 2.1.1: a line is at most 998 characters, CRLF excluded.
MAX_LINE = 998
# Headers no reply of ours carries, in any MIME part.
FORBIDDEN = {"bcc", "cc", "reply-to", "sender", "resent-to", "resent-bcc", "x-evil"}


def q_word(text: str) -> bytes:
    """``text`` as one Q-encoded UTF-8 word, every byte written =XX."""
    return b"=?UTF-8?Q?" + "".join(f"={b:02X}" for b in text.encode()).encode() + b"?="


def b_word(text: str) -> bytes:
    """``text`` as one B-encoded UTF-8 word."""
    return b"=?UTF-8?B?" + base64.b64encode(text.encode()) + b"?="


def b_words(text: str, size: int = 45) -> bytes:
    """``text`` as folded B-encoded words of ``size`` bytes each (readers join them, no spaces)."""
    data = text.encode()
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return b"\r\n ".join(b"=?UTF-8?B?" + base64.b64encode(c) + b"?=" for c in chunks)


def folded_words(count: int) -> bytes:
    """``count`` short words, folded into lines of eight: a long subject a server delivers."""
    words = [b"word%05d" % i for i in range(count)]
    return b"\r\n ".join(b" ".join(words[i : i + 8]) for i in range(0, count, 8))


def raw_message(subject: bytes, from_: bytes) -> bytes:
    """A message with ``subject`` and ``from_`` as written, stamped as Gmail stamps mail whose
    sender passed DMARC for example.com; CRLF line ends, a plain body."""
    head = [
        b"Authentication-Results: " + AUTHENTICATED.format(domain="example.com").encode(),
        b"From: " + from_,
        b"To: " + MAILBOX.encode(),
        b"Subject: " + subject,
        b"Date: " + format_datetime(datetime.now(UTC)).encode(),
        b"Message-ID: " + make_msgid(domain="example.com").encode(),
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
    ]
    return b"\r\n".join(head) + b"\r\n\r\nWhere is my invoice?\r\n"


@dataclass(frozen=True)
class Hostile:
    """One hostile message and what must become of it."""

    subject: bytes = b"Invoice question"
    from_: bytes = b"Ada <" + CUSTOMER.encode() + b">"
    #: The reply's whole Subject; None when only its start and the cap are known.
    reply_subject: str | None = "Re: Invoice question"
    #: Whether the customer gets a reply; when not, nobody does and no link is minted.
    answered: bool = True
    #: What the reply's Subject starts with when ``reply_subject`` is None.
    starts: str = "Re: Invoice"


BIDI = "\u202egnp.exe\u202c \u200bpay\u200d \u2067x\u2069\ufeff"
CONTROLS = "a\x00b\x07c\x1b[31md\x7fe\x85f\u2028g\u2029h\x0bi\x0cj\tk"

SUBJECT_CASES = {
    "bare-cr-ends-the-line": Hostile(b"Invoice question\rBcc: " + EVIL.encode()),
    "bare-lf-ends-the-line": Hostile(b"Invoice question\nBcc: " + EVIL.encode()),
    "folded-fake-header-is-text": Hostile(
        b"Invoice question\r\n Bcc: " + EVIL.encode(), reply_subject=f"Re: Invoice question Bcc: {EVIL}"
    ),
    "q-encoded-crlf": Hostile(
        b"Invoice =?UTF-8?Q?a=0D=0ABcc:_x@evil.test?=", reply_subject=f"Re: Invoice a Bcc: {EVIL}"
    ),
    "b-encoded-crlf-and-blank-line": Hostile(
        b"Invoice " + b_word(f"a\r\nBcc: {EVIL}\r\n\r\nX-Evil: 1"),
        reply_subject=f"Re: Invoice a Bcc: {EVIL} X-Evil: 1",
    ),
    "q-encoded-lf-alone": Hostile(
        b"Invoice " + q_word(f"a\nBcc: {EVIL}\nX-Evil: 1"),
        reply_subject=f"Re: Invoice a Bcc: {EVIL} X-Evil: 1",
    ),
    "double-encoded-crlf": Hostile(
        b"Invoice " + q_word("=?UTF-8?Q?a=0D=0ABcc:_x@evil.test?="),
        reply_subject=f"Re: Invoice a Bcc: {EVIL}",
    ),
    "encoded-nul-and-controls": Hostile(
        b"Invoice " + q_word(CONTROLS), reply_subject="Re: Invoice a b c [31md e f g h i j k"
    ),
    "raw-nul-and-controls": Hostile(
        b"Invoice \x00question\x07\x1b[31m\x7f", reply_subject="Re: Invoice question [31m"
    ),
    "bidi-and-zero-width-encoded": Hostile(
        b"Invoice " + b_word(BIDI), reply_subject=f"Re: Invoice {BIDI}"
    ),
    "bidi-and-zero-width-raw-utf8": Hostile(
        b"Invoice " + BIDI.encode(), reply_subject=f"Re: Invoice {BIDI}"
    ),
    "html-in-subject": Hostile(
        b"Invoice <img src=x onerror=alert(1)>",
        reply_subject="Re: Invoice <img src=x onerror=alert(1)>",
    ),
    "100-kb-folded": Hostile(
        b"Invoice " + folded_words(11_200), reply_subject=None, starts="Re: Invoice word00000 "
    ),
    "100-kb-one-encoded-word": Hostile(
        b"Invoice " + b_words("x" * 100_000), reply_subject=None, starts="Re: Invoice xxx"
    ),
    "1500-characters-without-a-space": Hostile(
        b"Invoice " + b_words("x" * 1500), reply_subject="Re: Invoice " + "x" * 1500
    ),
}

FROM_CASES = {
    "name-folded-fake-header": Hostile(from_=b'"Ada\r\n Bcc: x@evil.test" <ada@example.com>'),
    "name-bare-lf-ends-the-line": Hostile(
        from_=b'"Ada\nBcc: x@evil.test" <ada@example.com>', answered=False
    ),
    "name-bare-cr-ends-the-line": Hostile(
        from_=b'"Ada\rBcc: x@evil.test" <ada@example.com>', answered=False
    ),
    "name-q-encoded-crlf-quoted": Hostile(
        from_=b'"=?UTF-8?Q?a=0D=0ABcc:_x@evil.test?=" <ada@example.com>'
    ),
    # Gmail decodes the word: "a\r\nBcc: x@evil.test <ada@...>" reads as a group.
    "name-q-encoded-crlf": Hostile(
        from_=b"=?UTF-8?Q?a=0D=0ABcc:_x@evil.test?= <ada@example.com>", answered=False
    ),
    "name-b-encoded-crlf": Hostile(
        from_=b_word(f"a\r\nBcc: {EVIL}") + b" <ada@example.com>", answered=False
    ),
    "name-nul-and-controls": Hostile(from_=b'"Ada\x00\x07\x1b Lovelace" <ada@example.com>'),
    "name-bidi-and-zero-width": Hostile(from_=f'"{BIDI}" <ada@example.com>'.encode()),
    # Decoded by Gmail, the name is an address of another domain: not authenticated.
    "name-is-a-foreign-address": Hostile(
        from_=q_word(EVIL) + b" <ada@example.com>", answered=False
    ),
    # ...or an address in the customer's own domain, which DMARC cannot tell apart.
    "name-is-a-colleagues-address": Hostile(
        from_=q_word(COLLEAGUE) + b" <ada@example.com>", answered=False
    ),
    "name-is-a-colleagues-name-addr": Hostile(
        from_=q_word(f"Boss <{COLLEAGUE}>") + b" <ada@example.com>", answered=False
    ),
    "name-100-kb": Hostile(
        from_=b_words("A" * 100_000) + b" <ada@example.com>", answered=False
    ),
}


def header_block(raw: bytes) -> bytes:
    """The header block of a serialised message (CRLF line ends)."""
    return raw.split(b"\r\n\r\n", 1)[0]


def parse(raw: bytes) -> EmailMessage:
    """``raw`` as a receiving mail client reads it."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def names(message: EmailMessage) -> Counter[str]:
    """The header names of ``message``, lower-cased, with how often each occurs."""
    return Counter(name.lower() for name in message)


def part(message: EmailMessage, subtype: str) -> str:
    """The decoded content of the ``text/<subtype>`` part."""
    body = message.get_body(preferencelist=(subtype,))
    assert isinstance(body, EmailMessage) and body.get_content_subtype() == subtype
    return str(body.get_content())


def assert_well_formed(raw: bytes, expected_names: Counter[str], to: str) -> EmailMessage:
    """The checks every reply must pass, whatever the message it answers held."""
    block = header_block(raw)
    assert b"\x00" not in raw
    lines = raw.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines), "bare CR or LF"
    assert max(len(line) for line in lines) <= MAX_LINE
    for logical in re.sub(rb"\r\n(?=[ \t])", b"", block).split(b"\r\n"):
        assert re.match(rb"[!-9;-~]+:", logical), logical[:80]

    parsed = parse(raw)
    assert names(parsed) == expected_names
    for name, value in parsed.items():
        assert not any(ch in str(value) for ch in "\r\n\x00"), name
        assert not any(unicodedata.category(ch) == "Cc" for ch in str(value)), name
        if name.lower() != "subject":
            assert EVIL not in str(value) and COLLEAGUE not in str(value), name
    for mime_part in parsed.walk():
        assert not FORBIDDEN & {name.lower() for name in mime_part}
    assert parsed["To"].addresses == (Address(addr_spec=to),)
    assert str(parsed["To"]) == to
    return parsed


def run(sandbox: Sandbox, hostile: Hostile) -> tuple[EmailMessage | None, bytes | None, Counter[str]]:
    """Deliver the hostile message and an ordinary one, run once; return the reply to the hostile
    one (parsed and raw, or None) and the header names of the ordinary reply."""
    sandbox.stripe.add_customer(CUSTOMER, name=HOSTILE_NAME, subscription_statuses=["active"])
    sandbox.stripe.add_customer(COLLEAGUE, name="The Boss", subscription_statuses=["active"])
    sandbox.stripe.add_customer(ORDINARY, name="Grace Hopper", subscription_statuses=["active"])
    sandbox.gmail.deliver(person_mail(ORDINARY, "Invoice question", "Hi", name="Grace"))
    sandbox.gmail.deliver(raw_message(hostile.subject, hostile.from_))

    result = sandbox.cli("once")

    assert result.code == 0, result.stderr
    sent = sandbox.gmail.sent_messages()
    by_recipient = {str(s.message["To"]): s for s in sent}
    assert len(by_recipient) == len(sent), "two replies to one recipient"
    assert set(by_recipient) <= {ORDINARY, CUSTOMER}, set(by_recipient)
    ordinary = by_recipient[ORDINARY]
    baseline = names(parse(ordinary.raw))
    assert sum(baseline.values()) == len(baseline), "the ordinary reply repeats a header"
    answer = by_recipient.get(CUSTOMER)
    return (answer.message, answer.raw, baseline) if answer else (None, None, baseline)


class TestHostileSubjects:
    @pytest.mark.parametrize("hostile", SUBJECT_CASES.values(), ids=SUBJECT_CASES.keys())
    def test_reply_has_exactly_our_headers_and_a_clean_subject(
        self, sandbox: Sandbox, hostile: Hostile
    ) -> None:
        """The customer gets one reply, with the ordinary reply's headers each once, To only them, a one-line capped subject, the HTML escaped."""
        message, raw, baseline = run(sandbox, hostile)

        assert message is not None and raw is not None, "the customer got no reply"
        parsed = assert_well_formed(raw, baseline, CUSTOMER)
        subject = str(parsed["Subject"])
        assert len(subject) <= MAX_SUBJECT_CHARS
        if hostile.reply_subject is not None:
            assert subject == hostile.reply_subject
        else:
            assert subject.startswith(hostile.starts) and len(subject) == MAX_SUBJECT_CHARS
        html = part(parsed, "html")
        assert ESCAPED_NAME in html and "<script" not in html.lower()
        assert "<img" not in html.lower()
        # Plain text is not markup: the name stands there as the customer wrote it.
        assert HOSTILE_NAME in part(parsed, "plain")

    def test_html_in_the_subject_is_escaped_in_the_html_part(self, sandbox: Sandbox) -> None:
        """A subject holding a tag appears escaped in the HTML part and as written in the text part."""
        message, _, _ = run(sandbox, SUBJECT_CASES["html-in-subject"])

        assert message is not None
        assert "&lt;img src=x onerror=alert(1)&gt;" in part(message, "html")
        assert "<img src=x onerror=alert(1)>" in part(message, "plain")


class TestHostileDisplayNames:
    @pytest.mark.parametrize("hostile", FROM_CASES.values(), ids=FROM_CASES.keys())
    def test_reply_goes_to_the_authenticated_address_alone_or_not_at_all(
        self, sandbox: Sandbox, hostile: Hostile
    ) -> None:
        """A display name cannot add a header or a recipient: the customer alone is answered, or, when the From is not one clear mailbox, nobody."""
        message, raw, baseline = run(sandbox, hostile)

        sessions = sandbox.stripe.portal_sessions()
        if not hostile.answered:
            assert message is None, f"replied to {message and message['To']}"
            assert len(sessions) == 1, "a link was minted for the hostile message"
            return
        assert message is not None and raw is not None, "the customer got no reply"
        parsed = assert_well_formed(raw, baseline, CUSTOMER)
        assert str(parsed["Subject"]) == "Re: Invoice question"
        assert ESCAPED_NAME in part(parsed, "html")
        assert len(sessions) == 2


# --- build_reply alone, over any text --------------------------------------------------------

ORIGINAL_ID = "<CAF0001@mail.example.com>"
HOSTILE_PIECES = [
    "\r\n", "\r", "\n", "\x00", "\x85", "\u2028", "\u202e", "\u200b", "Bcc: x@evil.test",
    "\r\n\r\n", " ", "=?", "?=", "=?utf-8?q?a=0D=0ABcc:_x@evil.test?=", "<script>", "é", "Re:",
    "Invoice", ":", '"', "<", ">", ",", "(", ")", "\t",
]
# Long values are repetitions: drawing thousands of characters one by one is slow.
hostile_text = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(HOSTILE_PIECES), max_size=40).map("".join),
    st.integers(900, 2100).map(lambda n: "Invoice:" + "x" * n),
    st.builds(
        lambda piece, count: piece * count, st.text(min_size=1, max_size=4), st.integers(1, 400)
    ),
)


@functools.cache
def ordinary_reply_names() -> Counter[str]:
    """The header names build_reply gives an ordinary, well-threaded message."""
    original = IncomingMessage(
        "m1", "t1", frozenset({"INBOX", "UNREAD"}),
        (("From", f"Ada <{CUSTOMER}>"), ("Subject", "Invoice"), ("Message-ID", ORIGINAL_ID)),
    )  # fmt: skip
    reply, _ = build_reply(
        original, from_address=MAILBOX, from_name="Acme Support", to=CUSTOMER, subject="Invoice",
        text="t\n", html="<p>h</p>\n", message_id_domain="acme-saas.test",
    )  # fmt: skip
    return names(parse(bytes(reply)))


class TestBuildReplyOverAnyText:
    def test_the_ordinary_reply_has_the_headers_we_chose(self) -> None:
        """The reference set is what we mean to send: threading, RFC 3834 and MIME headers, each once."""
        assert ordinary_reply_names() == Counter(
            {
                "from": 1, "to": 1, "subject": 1, "date": 1, "message-id": 1, "in-reply-to": 1,
                "references": 1, "auto-submitted": 1, "x-auto-response-suppress": 1,
                "mime-version": 1, "content-type": 1,
            }
        )  # fmt: skip

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(
        subject=hostile_text,
        sender_name=hostile_text,
        our_name=hostile_text,
        body=hostile_text,
    )
    def test_serialised_reply_has_exactly_the_chosen_headers(
        self, subject: str, sender_name: str, our_name: str, body: str
    ) -> None:
        """Whatever the subject, the sender's display name, our name or the body hold, the reply as sent re-parses with exactly the chosen headers, each once, To the sender alone, the subject intact."""
        original = IncomingMessage(
            "m1", "t1", frozenset({"INBOX", "UNREAD"}),
            (("From", f"{sender_name} <{CUSTOMER}>"), ("Subject", subject),
             ("Message-ID", ORIGINAL_ID), ("Bcc", EVIL), ("Reply-To", EVIL)),
        )  # fmt: skip
        decoded = decode_header_value(subject)
        reply, own_id = build_reply(
            original, from_address=MAILBOX, from_name=our_name, to=CUSTOMER, subject=decoded,
            text=body, html=body, message_id_domain="acme-saas.test",
        )  # fmt: skip

        raw = bytes(reply)
        parsed = parse(raw)
        assert names(parsed) == ordinary_reply_names()
        lines = raw.split(b"\r\n")
        assert max(len(line) for line in lines) <= MAX_LINE
        assert all(b"\r" not in line and b"\n" not in line for line in lines)
        for name, value in parsed.items():
            assert not any(ch in str(value) for ch in "\r\n\x00"), name
        assert parsed["To"].addresses == (Address(addr_spec=CUSTOMER),)
        assert str(parsed["Subject"]) == reply_subject(decoded)
        assert len(str(parsed["Subject"])) <= MAX_SUBJECT_CHARS
        assert parsed["Message-ID"] == own_id
        assert parsed["In-Reply-To"] == ORIGINAL_ID
        sender = parsed["From"].addresses
        assert len(sender) == 1 and sender[0].addr_spec == MAILBOX
        assert "".join(sender[0].display_name.split()) == "".join(header_text(our_name).split())
