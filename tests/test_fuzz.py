"""Fuzzing the pure core with real mail: the corpus files, mutated, through message_from_bytes,
triage and, when triage says reply, reply composition as the pipeline does it.

Mutations act on the header block as a mail system or an attacker could damage it: byte flips,
truncation, inserted control bytes, headers duplicated, deleted, moved or spliced in from another
file, and headers set to encoded words, huge values, control bytes, random Authentication-Results
and random From values. Messages are also made to look like billing mail that Gmail
authenticated, so the reply path is taken often, not only when the fuzzer stumbles on it.

What must hold: no exception escapes; every outcome is a Decision with at least one non-empty
one-line reason; a reply goes to a sender that is exactly one address, and the composed reply's To
is that address; nothing a message contains adds a header to the reply.

Deterministic (``derandomize``) and bounded: the whole file runs in a few seconds.
"""

from __future__ import annotations

import email
import email.policy
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from billing_responder.mail import (
    MAX_SUBJECT_CHARS,
    build_reply,
    decode_header_value,
    domain_of,
    message_from_bytes,
    original_message_id,
    reply_message_id_domain,
    reply_subject,
    sender_address,
)
from billing_responder.model import Action, Decision
from billing_responder.render import ReplyContext, ReplyRenderer
from billing_responder.triage import TriagePolicy, decide
from tests.test_corpus import CORPUS, EXPECTED_FILES, corpus_files

MAILBOX = "billing@support.example.net"
POLICY = TriagePolicy(keywords=("invoice", "billing"), mailbox_address=MAILBOX)
CUSTOMER = "customer@customer.example"
EVIL = "x@evil.test"
MAX_LINE = 998  # RFC 5322 2.1.1, CRLF excluded
#: Every reply has these; In-Reply-To and References only when the original has ids to thread on.
ALWAYS = Counter(
    {"from": 1, "to": 1, "subject": 1, "date": 1, "message-id": 1, "auto-submitted": 1,
     "x-auto-response-suppress": 1, "mime-version": 1, "content-type": 1}
)  # fmt: skip
THREADING = Counter({"in-reply-to": 1, "references": 1})

#: Examples per property: three to six seconds each on a two-core machine.
EXAMPLES = 600


@dataclass(frozen=True)
class Seeds:
    """The corpus files' bytes: every file, and the human ones alone."""

    every: tuple[bytes, ...]
    human: tuple[bytes, ...]


@pytest.fixture(scope="module")
def seeds() -> Seeds:
    """The corpus, read once; a missing or incomplete corpus fails the tests, never skips them."""
    files = {kind: corpus_files(kind) for kind in EXPECTED_FILES}
    for kind, expected in EXPECTED_FILES.items():
        if len(files[kind]) < expected:
            pytest.fail(
                f"the mail corpus is missing or incomplete under {CORPUS / kind}"
                f" ({len(files[kind])} of {expected} files); see its README"
            )
    human = tuple(path.read_bytes() for path in files["human"])
    return Seeds(human + tuple(path.read_bytes() for path in files["automated"]), human)


@pytest.fixture(scope="module")
def renderer() -> ReplyRenderer:
    """The shipped templates, as the pipeline renders a reply with them."""
    return ReplyRenderer(None)


# --- a message as header fields, for mutating ------------------------------------------------

_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class Draft:
    """A raw message cut into header fields (continuation lines included) and the rest."""

    fields: list[bytes]
    body: bytes
    newline: bytes

    @classmethod
    def of(cls, raw: bytes) -> Draft:
        """Cut ``raw`` at its first empty line and its header lines."""
        end = _HEADER_END.search(raw)
        head, body = (raw[: end.start()], raw[end.end() :]) if end else (raw, b"")
        newline = b"\r\n" if b"\r\n" in head else b"\n"
        fields: list[bytes] = []
        for line in re.split(rb"\r?\n", head):
            if fields and line[:1] in (b" ", b"\t"):
                fields[-1] += newline + line
            else:
                fields.append(line)
        return cls(fields, body, newline)

    def raw(self) -> bytes:
        """The message again, in its own line ending."""
        return self.newline.join(self.fields) + self.newline * 2 + self.body

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every ``name`` header by one with ``value``, where the first one was."""
        wanted = name.lower()
        at = next((i for i, f in enumerate(self.fields) if _name(f) == wanted), 0)
        self.fields = [f for f in self.fields if _name(f) != wanted]
        self.fields.insert(min(at, len(self.fields)), name + b": " + value)


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


# --- values ------------------------------------------------------------------------------------

CONTROL_BYTES = [
    b"\x00", b"\r", b"\n", b"\r\n", b"\r\n ", b"\x1b", b"\x7f", b"\x0b", b"\x0c", b"\t", b"\xc2\x85",
    "\u2028".encode(), "\u202e".encode(), "\u200b".encode(), b"\xff", b"\xfe\xff", b"\x80",
]  # fmt: skip
CHARSETS = ["utf-8", "UTF-8", "iso-8859-1", "iso-2022-jp", "x-unknown", "base64", "utf-8*en", "a"]

encoded_words = st.builds(
    lambda charset, encoding, text: f"=?{charset}?{encoding}?{text}?=".encode(),
    st.sampled_from(CHARSETS),
    st.sampled_from("bBqQx"),
    st.text(st.sampled_from("abcXYZ019+/=_?. \r\n\x00"), max_size=40),
)
huge_values = st.builds(
    lambda piece, count: piece * count,
    st.sampled_from([b"a", b"Re: ", b"(", b'"', b"=?", b"=?utf-8?q?x?= ", b"<a@b.c> ", b"a=b ",
                     b"\\", b"Invoice ", b"\xc3\xa9", b"dkim=pass ", b";", b"1/"]),
    st.integers(1_000, 60_000),
)  # fmt: skip
domains = st.sampled_from(["customer.example", "gmail.com", "evil.test", "", "[192.0.2.1]", "a"])
auth_results = st.lists(
    st.one_of(
        st.sampled_from(["mx.google.com", "evil.test", "MX.GOOGLE.COM", " ", "(c) mx.google.com"]),
        st.builds(
            lambda method, result, prop, domain: f"{method}={result} {prop}={domain}",
            st.sampled_from(["dmarc", "dkim", "spf", "arc", "dmarc/1", "x"]),
            st.sampled_from(["pass", "fail", "none", "bestguesspass", "", '"pass"']),
            st.sampled_from(["header.from", "header.d", "header.i", "smtp.mailfrom", "x"]),
            domains,
        ),
        st.sampled_from(["(dmarc=pass header.from=customer.example)", '"', "\\", "=", "/"]),
    ),
    max_size=6,
).map(lambda parts: "; ".join(parts).encode())
from_values = st.lists(
    st.sampled_from([
        CUSTOMER, f"<{CUSTOMER}>", "Customer", '"Customer, Paying"', "=?utf-8?q?C=C3=BCstomer?=",
        f"=?utf-8?q?{EVIL}?=", EVIL, "<>", "MAILER-DAEMON", "no-reply@customer.example", ",",
        ":", ";", "(comment)", "(", ")", '"', "<", ">", "@", "\r\n ", "\x00", "\u202e", MAILBOX,
        "Group:", "undisclosed-recipients:;", "ü@customer.example",
    ]),
    max_size=6,
).map(lambda parts: " ".join(parts).encode())  # fmt: skip
values = st.one_of(
    encoded_words,
    huge_values,
    st.binary(max_size=60),
    st.text(max_size=60).map(str.encode),
    st.lists(st.sampled_from(CONTROL_BYTES), max_size=5).map(b"Invoice ".join),
    auth_results,
    from_values,
)
HEADER_NAMES = [
    b"Subject", b"From", b"Authentication-Results", b"Message-ID", b"References", b"In-Reply-To",
    b"Auto-Submitted", b"Content-Type", b"Return-Path", b"Sender", b"Precedence", b"List-Id",
    b"Bcc", b"Reply-To", b"X-Whatever", b"Subject ", b"from", b" From",
]  # fmt: skip


# --- mutations ---------------------------------------------------------------------------------


def _header_mutation(draw: st.DrawFn, draft: Draft, every: tuple[bytes, ...]) -> None:
    fields = draft.fields
    spot = draw(st.integers(0, len(fields)))
    kind = draw(st.sampled_from(["dup", "delete", "move", "splice", "set", "insert"]))
    event(f"mutation: {kind}")
    if kind == "set":
        draft.set(draw(st.sampled_from(HEADER_NAMES)), draw(values))
    elif kind == "insert":
        fields.insert(spot, draw(st.sampled_from(HEADER_NAMES)) + b": " + draw(values))
    elif kind == "splice":
        other = Draft.of(draw(st.sampled_from(every))).fields
        fields.insert(spot, other[draw(st.integers(0, len(other) - 1))])
    elif fields:
        index = draw(st.integers(0, len(fields) - 1))
        if kind == "dup":
            fields.insert(spot, fields[index])
        elif kind == "delete":
            del fields[index]
        else:
            fields.insert(min(spot, len(fields) - 1), fields.pop(index))


def _byte_mutation(draw: st.DrawFn, raw: bytes) -> bytes:
    end = _HEADER_END.search(raw)
    reach = end.end() if end else len(raw)  # only the header block is ever read
    if not raw:
        return draw(st.sampled_from(CONTROL_BYTES))
    at = draw(st.integers(0, max(reach - 1, 0)))
    kind = draw(st.sampled_from(["flip", "truncate", "control"]))
    event(f"mutation: {kind}")
    if kind == "flip":
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    if kind == "truncate":
        return raw[:at]
    return raw[:at] + draw(st.sampled_from(CONTROL_BYTES)) + raw[at:]


def looks_like_billing(draft: Draft) -> None:
    """Give the message a billing Subject and Gmail's stamp for its From's domain, if it has one."""
    draft.set(b"Subject", b"Re: question about my invoice")
    sender = sender_address(message_from_bytes(draft.raw()))
    domain = domain_of(sender) if isinstance(sender, str) else None
    if domain:
        stamp = f"mx.google.com; dkim=pass header.d={domain}; dmarc=pass header.from={domain}"
        draft.fields.insert(0, b"Authentication-Results: " + stamp.encode())


@st.composite
def mutated(draw: st.DrawFn, seeds: Seeds, billing: bool) -> bytes:
    """A corpus file with header and byte mutations applied; when ``billing``, a person's file
    three times in four, made to look like authenticated billing mail before the header mutations
    and perhaps again after them, with at most one byte mutation."""
    pool = seeds.every
    if billing:
        pool = draw(st.sampled_from([seeds.human, seeds.human, seeds.human, seeds.every]))
    draft = Draft.of(draw(st.sampled_from(pool)))
    if billing:
        looks_like_billing(draft)
    for _ in range(draw(st.integers(0, 4))):
        _header_mutation(draw, draft, seeds.every)
    if billing and draw(st.booleans()):
        looks_like_billing(draft)
    raw = draft.raw()
    for _ in range(draw(st.integers(0, 1 if billing else 3))):
        raw = _byte_mutation(draw, raw)
    return raw


# --- the properties ------------------------------------------------------------------------------


def one_line(text: str) -> bool:
    """Whether ``text`` is non-empty, one line, and free of control characters."""
    return bool(text.strip()) and not any(
        unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text
    )


def triage_and_answer(raw: bytes, renderer: ReplyRenderer) -> Decision:
    """Everything the pure core does with ``raw``, checking what must hold on the way."""
    message = message_from_bytes(raw)
    decision = decide(message, POLICY)
    assert isinstance(decision, Decision) and isinstance(decision.action, Action)
    assert decision.reasons and all(one_line(reason) for reason in decision.reasons)
    if decision.action is not Action.REPLY:
        return decision

    sender = decision.sender
    assert sender is not None
    parsed_sender = email.policy.default.header_factory("to", sender)
    assert [a.addr_spec for a in parsed_sender.addresses] == [sender]
    subject = decode_header_value(message.get("Subject") or "")
    rendered = renderer.render(
        ReplyContext(
            customer_name="Paying Customer",
            portal_url="https://billing.stripe.com/p/session/test_1",
            original_subject=subject,
            signature="Acme",
        )
    )
    reply, own_id = build_reply(
        message,
        from_address=MAILBOX,
        from_name="Acme Support",
        to=sender,
        subject=subject,
        text=rendered.text,
        html=rendered.html,
        message_id_domain=reply_message_id_domain(MAILBOX),
    )

    wire = bytes(reply)
    lines = wire.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert b"\x00" not in wire and max(map(len, lines)) <= MAX_LINE
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    names = Counter(name.lower() for name in parsed)
    threaded = original_message_id(message) is not None
    assert ALWAYS <= names <= ALWAYS + THREADING, names
    assert ("in-reply-to" in names) == threaded
    for name, value in parsed.items():
        assert not any(ch in str(value) for ch in "\r\n\x00"), name
    assert parsed["To"].addresses == (Address(addr_spec=sender),)
    assert parsed["Message-ID"] == own_id
    assert str(parsed["Subject"]) == reply_subject(subject)
    assert len(str(parsed["Subject"])) <= MAX_SUBJECT_CHARS
    return decision


class TestMutatedCorpus:
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None)
    @given(data=st.data())
    def test_any_mutation_gives_a_decision_with_reasons(
        self, seeds: Seeds, renderer: ReplyRenderer, data: st.DataObject
    ) -> None:
        """Any mutation of any corpus file is triaged without an exception, with one-line reasons, and a reply, if any, is well-formed and goes to the sender alone."""
        raw = data.draw(mutated(seeds, billing=False), label="raw")
        event(f"decision: {triage_and_answer(raw, renderer).action.value}")

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None)
    @given(data=st.data())
    def test_mutated_billing_mail_gets_a_clean_reply_or_a_reason(
        self, seeds: Seeds, renderer: ReplyRenderer, data: st.DataObject
    ) -> None:
        """Billing mail that Gmail authenticated, mutated, is answered with exactly our headers, To the one sender, or not answered for a stated reason."""
        raw = data.draw(mutated(seeds, billing=True), label="raw")
        event(f"decision: {triage_and_answer(raw, renderer).action.value}")

    def test_the_billing_variant_reaches_the_reply_path(
        self, seeds: Seeds, renderer: ReplyRenderer
    ) -> None:
        """Every person's message made to look like authenticated billing mail is answered, so the fuzzing above reaches composition."""
        for raw in seeds.human:
            draft = Draft.of(raw)
            looks_like_billing(draft)
            assert triage_and_answer(draft.raw(), renderer).action is Action.REPLY
