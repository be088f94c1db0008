"""Pure mail helpers: decoding header values, reading addresses, composing the threaded reply.

Nothing here does I/O. Every function takes header text as the mail system delivered it (raw,
possibly with RFC 2047 encoded words, possibly already decoded by Gmail) and is total on hostile
input: malformed values come back as a typed problem or are dropped, never as an exception, except
where the caller hands us *our own* values (addresses, domains from the configuration) and a bad
one is a bug worth stopping for (``ValueError``).

Addresses are read with :mod:`email.headerregistry`, never by splitting strings. The reply is an
:class:`email.message.EmailMessage` under (a variant of) :data:`email.policy.SMTP`, and every value
placed in one of its headers is first reduced to a single line without control characters, so a
hostile subject or name cannot add a header.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.errors import HeaderParseError, InvalidHeaderDefect
from email.headerregistry import (
    Address,
    BaseHeader,
    HeaderRegistry,
    UniqueAddressHeader,
    UnstructuredHeader,
)
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime, make_msgid

from billing_responder.model import IncomingMessage

#: How much of a raw file's header block :func:`message_from_bytes` reads; the rest is ignored.
MAX_HEADER_BLOCK_BYTES = 1_048_576

#: Longest subject we put on a reply, in characters, ``Re: `` included. Gmail threads a reply
#: only when its subject matches the original's, so any subject a person writes must survive
#: whole; the cap only bounds a hostile one (the header is folded, so no line gets too long).
MAX_SUBJECT_CHARS = 2000

#: Longest value we hand to the standard library's address parser; longer ones are refused.
MAX_ADDRESS_HEADER_CHARS = 2_000

#: Deepest nesting of comments, ``(a (b (c)))``, we hand to the address parser: it recurses once
#: per level and a few hundred levels exhaust Python's stack. Real mail nests one or two deep.
MAX_COMMENT_DEPTH = 20

#: At most this many message ids go into a reply's References (the first and the latest ones).
MAX_REFERENCES = 20

#: The marker :func:`new_message_id` puts in our Message-IDs, so replies to them are recognised.
OWN_MESSAGE_ID_MARKER = "billing-responder"

# The standard library's header parser is known to raise these (and not only HeaderParseError) on
# hostile input, e.g. IndexError for "user@" or AttributeError for "_.:" on Python 3.11; and
# RecursionError, should some nesting other than comments (refused beforehand) go deep.
_PARSER_ERRORS = (
    HeaderParseError, ValueError, IndexError, AttributeError, TypeError, RecursionError,
)  # fmt: skip


# --- decoding --------------------------------------------------------------------------------

# RFC 2047 section 2: =?charset?encoding?encoded-text?= ; charset may carry an RFC 2231 *language.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")


def decode_header_value(value: str) -> str:
    """Decode RFC 2047 encoded words and reduce ``value`` to one clean line.

    Tolerant: an unknown charset falls back to UTF-8, bytes that do not decode become U+FFFD, a
    damaged encoded word stays as written. Folding (CR/LF) and every other control character become
    a space, runs of white space become one space, and the ends are trimmed. Whatever still looks
    like the start of an encoded word has its ``=?`` written ``= ?`` (see :func:`header_text`), so
    decoding is idempotent: already decoded values, such as Gmail's metadata format may return,
    come back unchanged, and ``decode_header_value(decode_header_value(v))`` is always
    ``decode_header_value(v)``.
    """
    pieces: list[str] = []
    run_charset: str | None = None
    run_bytes = b""
    position = 0
    for match in _ENCODED_WORD.finditer(value):
        gap = value[position : match.start()]
        # White space between two adjacent encoded words is not part of the text (RFC 2047 6.2).
        if gap and (run_charset is None or gap.strip()):
            if run_charset is not None:
                pieces.append(_decode_bytes(run_bytes, run_charset))
                run_charset, run_bytes = None, b""
            pieces.append(gap)
        position = match.end()
        charset = match.group(1).split("*", 1)[0].lower()
        data = _decode_encoded_text(match.group(2), match.group(3))
        if data is None:  # damaged: keep it as the sender wrote it
            if run_charset is not None:
                pieces.append(_decode_bytes(run_bytes, run_charset))
                run_charset, run_bytes = None, b""
            pieces.append(match.group(0))
            continue
        # Adjacent words in one charset are joined before decoding: senders split multi-byte
        # characters across words.
        if run_charset is not None and charset != run_charset:
            pieces.append(_decode_bytes(run_bytes, run_charset))
            run_bytes = b""
        run_charset = charset
        run_bytes += data
    if run_charset is not None:
        pieces.append(_decode_bytes(run_bytes, run_charset))
    pieces.append(value[position:])
    return header_text("".join(pieces))


def _decode_encoded_text(encoding: str, text: str) -> bytes | None:
    if encoding in "bB":
        compact = re.sub(r"[^A-Za-z0-9+/]", "", text)
        if len(compact) % 4 == 1:  # cannot be base64 whatever the padding
            return None
        try:
            return base64.b64decode(compact + "=" * (-len(compact) % 4))
        except binascii.Error:
            return None
    return binascii.a2b_qp(text.encode("utf-8", errors="replace"), header=True)


def _decode_bytes(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset, errors="replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        # Unknown or non-text codec name ("x-unknown", "base64", "undefined", ...).
        return data.decode("utf-8", errors="replace")


def single_line(text: str) -> str:
    """``text`` with control, line-separator and surrogate characters removed, spaces collapsed."""
    return " ".join("".join(_CLEAN.get(unicodedata.category(ch), ch) for ch in text).split())


_CLEAN = {"Cc": " ", "Zl": " ", "Zp": " ", "Cs": "\ufffd"}


def header_text(text: str) -> str:
    """``text`` made safe to put in a header of ours: one clean line, no encoded-word lookalikes.

    The standard library reads a value assigned to a header as raw header text and decodes
    anything shaped like an encoded word in it (and writes such text out unprotected), so a
    decoded subject that still contains ``=?`` would not survive; ``=?`` becomes ``= ?``.
    """
    return single_line(text).replace("=?", "= ?")


# --- raw files -------------------------------------------------------------------------------

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_BREAK = re.compile(rb"\r?\n")
# RFC 5322 field name: printable US-ASCII except colon; obsolete syntax allows space before it.
_FIELD = re.compile(r"([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)", re.DOTALL)


def message_from_bytes(
    raw: bytes,
    *,
    id: str = "file",  # shadows the builtin on purpose: the name Gmail and IncomingMessage use
    thread_id: str = "file",
    label_ids: frozenset[str] = frozenset({"INBOX", "UNREAD"}),
) -> IncomingMessage:
    """Read the header block of a raw RFC 5322 message (a ``.eml`` file) into an IncomingMessage.

    Only the headers are read, up to the first empty line and at most
    :data:`MAX_HEADER_BLOCK_BYTES`. LF and CRLF line ends both work; an mbox ``From `` line and
    lines that are not headers are skipped (so one bad line cannot hide the headers after it);
    bytes that are not UTF-8 become U+FFFD instead of raising. Values are unfolded but otherwise
    raw: encoded words stay encoded, as in the Gmail API.
    """
    if raw.startswith((b"\n", b"\r\n")):  # an empty header block: everything is body
        block = b""
    else:
        end = _HEADER_END.search(raw, 0, MAX_HEADER_BLOCK_BYTES)
        block = raw[: end.start()] if end else raw[:MAX_HEADER_BLOCK_BYTES]
    headers: list[list[str]] = []
    for number, line_bytes in enumerate(_LINE_BREAK.split(block)):
        line = line_bytes.decode("utf-8", errors="replace")
        if line[:1] in (" ", "\t"):
            if headers:
                headers[-1][1] += line  # unfold: the line break goes, the white space stays
            continue
        field = _FIELD.fullmatch(line)
        if field is None or (number == 0 and line.startswith("From ")):
            continue
        headers.append([field.group(1), field.group(2).lstrip(" \t")])
    return IncomingMessage(
        id=id,
        thread_id=thread_id,
        label_ids=label_ids,
        headers=tuple((name, value.rstrip("\r")) for name, value in headers),
    )


# --- addresses -------------------------------------------------------------------------------


class SenderProblemKind(enum.Enum):
    """Why a message has no single usable sender address."""

    MISSING = "missing"
    REPEATED = "repeated"
    NULL = "null"
    GROUP = "group"
    SEVERAL = "several"
    UNPARSEABLE = "unparseable"
    INCOMPLETE = "incomplete"
    NON_ASCII = "non-ascii"


@dataclass(frozen=True)
class SenderProblem:
    """The From header cannot name the one address a reply should go to; ``detail`` says why."""

    kind: SenderProblemKind
    detail: str

    def __str__(self) -> str:
        return self.detail


def mailboxes(value: str) -> tuple[Address, ...] | None:
    """Every mailbox an address header names (groups flattened), or None when it cannot be parsed.

    Encoded words in display names are decoded by the parser. Values longer than
    :data:`MAX_ADDRESS_HEADER_CHARS` are refused rather than fed to a parser with quadratic corners,
    and so are comments nested deeper than :data:`MAX_COMMENT_DEPTH` (the parser recurses on them).
    """
    parsed = _parse_address_header(value)
    if parsed is None:
        return None
    return tuple(address for group in parsed for address in group[1])


def _parse_address_header(value: str) -> tuple[tuple[str | None, tuple[Address, ...]], ...] | None:
    if len(value) > MAX_ADDRESS_HEADER_CHARS or _comment_depth(value) > MAX_COMMENT_DEPTH:
        return None
    # The parser rejects CR/LF outright; a folded value is one line to it.
    text = " ".join(value.replace("\x00", " ").split())
    try:
        header = policy.default.header_factory("from", text)
        groups = tuple((g.display_name, tuple(g.addresses)) for g in header.groups)
        for _, addresses in groups:
            for address in addresses:
                _ = address.addr_spec, address.display_name
    except _PARSER_ERRORS:
        return None
    return groups


def _comment_depth(value: str) -> int:
    """How deep the comments of a structured value nest (quoted strings and escapes respected)."""
    deepest = depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"' and not depth:
            quoted = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")" and depth:
            depth -= 1
    return deepest


def _has_invalid_defect(value: str) -> bool:
    """Whether the parser had to skip or guess at part of an address header's value."""
    text = " ".join(value.replace("\x00", " ").split())
    try:
        header = policy.default.header_factory("from", text)
    except _PARSER_ERRORS:
        return True
    return any(isinstance(defect, InvalidHeaderDefect) for defect in header.defects)


def sender_address(message: IncomingMessage) -> str | SenderProblem:
    """The single addr-spec of the message's From header, or the problem that prevents one.

    Problems: no From header, several From headers, the null address ``<>``, group syntax, several
    addresses, an unparseable value, an address without local part or domain, and non-ASCII
    addresses (which need SMTPUTF8 and a person's judgement about which customer is meant).
    """
    values = message.get_all("From")
    if not values:
        return SenderProblem(SenderProblemKind.MISSING, "the message has no From header")
    if len(values) > 1:
        return SenderProblem(
            SenderProblemKind.REPEATED, f"the message has {len(values)} From headers"
        )
    if not values[0].strip():
        return SenderProblem(SenderProblemKind.MISSING, "the From header is empty")
    shown = _shorten(decode_header_value(values[0]))
    groups = _parse_address_header(values[0])
    if groups is None:
        return SenderProblem(SenderProblemKind.UNPARSEABLE, f"From cannot be parsed: {shown!r}")
    if any(name is not None for name, _ in groups):
        return SenderProblem(SenderProblemKind.GROUP, f"From uses group syntax: {shown!r}")
    addresses = [address for _, group in groups for address in group]
    if len(addresses) != 1:
        kind = SenderProblemKind.SEVERAL if addresses else SenderProblemKind.UNPARSEABLE
        return SenderProblem(kind, f"From names {len(addresses)} addresses: {shown!r}")
    address = addresses[0]
    if not address.username and not address.domain:
        return SenderProblem(SenderProblemKind.NULL, "From is the null address <>")
    if not address.username or not address.domain:
        return SenderProblem(
            SenderProblemKind.INCOMPLETE, f"From lacks a local part or domain: {shown!r}"
        )
    if _has_invalid_defect(values[0]):
        # The standard parser recovers from what it cannot read by dropping it: it reads
        # 'ceo@customer.example <attacker@evil.test>' (what Gmail hands back for an encoded display
        # name) as ceo@customer.example alone. Whatever it had to guess at is not an address.
        return SenderProblem(
            SenderProblemKind.UNPARSEABLE, f"From does not parse strictly: {shown!r}"
        )
    if not address.addr_spec.isascii():
        return SenderProblem(
            SenderProblemKind.NON_ASCII, f"From is not an ASCII address: {shown!r}"
        )
    if _valid_addr_spec(address.addr_spec) is None:
        return SenderProblem(SenderProblemKind.UNPARSEABLE, f"From cannot be parsed: {shown!r}")
    return address.addr_spec


def _valid_addr_spec(addr_spec: str) -> Address | None:
    """The Address for a complete, single-line, ASCII addr-spec, or None."""
    if not addr_spec.isascii() or single_line(addr_spec) != addr_spec:
        return None
    try:
        address = Address(addr_spec=addr_spec)
    except _PARSER_ERRORS:
        return None
    if not address.username or not address.domain or address.addr_spec != addr_spec:
        return None
    return address


def reply_message_id_domain(mailbox_address: str) -> str:
    """The domain part of our mailbox address, lower-cased, for our Message-IDs.

    Raises ValueError when ``mailbox_address`` is not a plain ASCII addr-spec.
    """
    address = _valid_addr_spec(mailbox_address)
    if address is None or not _DOMAIN.fullmatch(address.domain):
        raise ValueError(f"not a usable mailbox address: {mailbox_address!r}")
    return address.domain.lower()


def same_address(left: str, right: str) -> bool:
    """Whether two addr-specs name the same mailbox, ignoring case, as mail systems do."""
    return left.strip().casefold() == right.strip().casefold()


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# --- message ids -----------------------------------------------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
# RFC 5322 3.6.4 msg-id without the obsolete forms; longer ones are dropped as garbage.
_MSG_ID = re.compile(rf"<{_DOT_ATOM}@(?:{_DOT_ATOM}|\[[\x21-\x5a\x5e-\x7e]*\])>")
_MAX_MSG_ID_CHARS = 250


def message_ids(value: str | None) -> tuple[str, ...]:
    """The well-formed ``<id@domain>`` message ids in a header value, in order, garbage dropped."""
    if not value:
        return ()
    return tuple(m for m in _MSG_ID.findall(value) if len(m) <= _MAX_MSG_ID_CHARS)


def original_message_id(message: IncomingMessage) -> str | None:
    """The message's own Message-ID when it is well-formed, else None."""
    found = message_ids(message.get("Message-ID"))
    return found[0] if found else None


def new_message_id(domain: str) -> str:
    """A fresh, unique Message-ID in ``domain`` that :func:`is_own_message_id` recognises."""
    if not _DOMAIN.fullmatch(domain):
        raise ValueError(f"not a usable Message-ID domain: {domain!r}")
    return make_msgid(idstring=OWN_MESSAGE_ID_MARKER, domain=domain)


def is_own_message_id(message_id: str) -> bool:
    """Whether ``message_id`` looks like one :func:`new_message_id` made."""
    return f".{OWN_MESSAGE_ID_MARKER}@" in message_id


def _references(message: IncomingMessage, parent_id: str | None) -> tuple[str, ...]:
    # RFC 5322 3.6.4: the parent's References (or, lacking them, its single In-Reply-To id)
    # followed by the parent's Message-ID.
    chain = list(message_ids(message.get("References")))
    if not chain:
        in_reply_to = message_ids(message.get("In-Reply-To"))
        chain = list(in_reply_to) if len(in_reply_to) == 1 else []
    if parent_id is not None:
        chain.append(parent_id)
    unique = list(dict.fromkeys(chain))
    if len(unique) > MAX_REFERENCES:
        unique = [unique[0], *unique[-(MAX_REFERENCES - 1) :]]
    return tuple(unique)


class _MessageIdsHeader(UnstructuredHeader, BaseHeader):
    """Message-ID, In-Reply-To and References: one msg-id per line, never made encoded words.

    The standard library folds In-Reply-To and References as unstructured text and, for an id
    longer than the space left on a 78-character line, RFC 2047-encodes it, which no reader takes
    for a message id; it also moves a long Message-ID to a continuation line.
    """

    def fold(self, *, policy: Policy) -> str:
        """The header as ``Name: <id>`` lines joined by folding white space."""
        ids = message_ids(str(self))
        if not ids:  # not ours to improve on
            return super().fold(policy=policy)
        return f"{self.name}: " + f"{policy.linesep} ".join(ids) + policy.linesep


class _SubjectHeader(UnstructuredHeader, BaseHeader):
    """A Subject folded so that it reads back exactly.

    Python 3.11 folds a long non-ASCII subject into encoded words and can drop the space between
    two of them (readers ignore white space between encoded words). Ours, already one clean line
    (:func:`header_text`), is folded at its spaces when ASCII and otherwise sent as a run of UTF-8
    encoded words that carry their spaces inside them. An ASCII word too long for any line
    (RFC 5322 2.1.1: 998 characters) cannot be folded, so such a subject is sent encoded too.
    """

    def fold(self, *, policy: Policy) -> str:
        """The header folded to lines of at most 78 characters where the words allow."""
        text = str(self)
        lines = _folded_at_spaces(f"{self.name}:", text) if text.isascii() else None
        if lines is None:
            lines = _folded_encoded(f"{self.name}:", text)
        return policy.linesep.join(lines) + policy.linesep


# typeshed types BaseHeader's and AddressHeader's attributes differently; at run time the
# registry itself makes every header class from exactly these two bases.
class _FromHeader(UniqueAddressHeader, BaseHeader):  # type: ignore[misc]
    """Our From, folded so that it reads back as written.

    Python 3.11 drops the quotes around a display name it has to fold, so a long name holding
    ``:``, ``,`` or ``"`` comes back as a group, as no name, or with the address swallowed into
    it. A From that fits on one line is left to the standard library; in a longer one an ASCII
    name is a quoted string folded at its spaces (RFC 5322 3.2.4), any other name UTF-8 encoded
    words, and the address follows.
    """

    def fold(self, *, policy: Policy) -> str:
        """The header on one line when it fits, else folded with the name kept whole."""
        folded = super().fold(policy=policy)
        name = self.addresses[0].display_name if len(self.addresses) == 1 else ""
        if folded.count(policy.linesep) == 1 or not name:
            return folded
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines = _folded_at_spaces(f"{self.name}:", quoted) if name.isascii() else None
        if lines is None:
            lines = _folded_encoded(f"{self.name}:", name)
        lines.append(f" <{self.addresses[0].addr_spec}>")
        return policy.linesep.join(lines) + policy.linesep


def _folded_at_spaces(first: str, text: str) -> list[str] | None:
    """``first`` and ``text`` as lines folded at the spaces of ``text``, each space kept (it
    starts the next line); None when a word is too long for any line."""
    lines = [first]
    for word in text.split(" "):
        if lines[-1] != first and len(lines[-1]) + 1 + len(word) > _FOLD_WIDTH:
            lines.append("")
        lines[-1] += " " + word
    return lines if max(map(len, lines)) <= _MAX_LINE else None


def _folded_encoded(first: str, text: str) -> list[str]:
    """``first`` and ``text`` as a run of UTF-8 encoded words, one a line."""
    words = _encoded_words(text)
    return [f"{first} {words[0]}", *(" " + word for word in words[1:])]


_FOLD_WIDTH = 78
#: RFC 5322 2.1.1: no line of a message may be longer, line end excluded.
_MAX_LINE = 998
# 39 bytes of UTF-8 make 52 base64 characters: "Subject: " plus one word stays within 78.
_ENCODED_WORD_BYTES = 39


def _encoded_words(text: str) -> list[str]:
    chunks: list[bytes] = [b""]
    for ch in text:
        data = ch.encode("utf-8")
        if chunks[-1] and len(chunks[-1]) + len(data) > _ENCODED_WORD_BYTES:
            chunks.append(b"")
        chunks[-1] += data
    return ["=?utf-8?b?" + base64.b64encode(chunk).decode("ascii") + "?=" for chunk in chunks]


_REPLY_HEADERS = HeaderRegistry()
for _name in ("message-id", "in-reply-to", "references"):
    _REPLY_HEADERS.map_to_type(_name, _MessageIdsHeader)
_REPLY_HEADERS.map_to_type("subject", _SubjectHeader)
_REPLY_HEADERS.map_to_type("from", _FromHeader)
#: The policy of every reply: SMTP line ends, CR/LF in values refused, msg-id lists kept intact.
REPLY_POLICY = policy.SMTP.clone(header_factory=_REPLY_HEADERS)


# --- the reply -------------------------------------------------------------------------------

# Reply prefixes in common use: Re, RE, Re[2], Re(2), Re^2, and the German, Dutch, Nordic, Polish,
# Turkish and Chinese equivalents.
_REPLY_PREFIX = re.compile(
    r"^\s*(?:re|aw|antw|sv|vs|odp|ynt|回复|回覆|答复)\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*[:\uff1a]\s*",
    re.IGNORECASE,
)


def reply_subject(original_subject: str) -> str:
    """``Re: `` and the original subject, without stacking prefixes, on one capped line.

    The subject is decoded first (harmless if it already is), every leading reply prefix ("Re:",
    "RE:", "Re[2]:", "AW:", "SV:", ...) is removed, the rest made :func:`header_text`, and the
    result cut to :data:`MAX_SUBJECT_CHARS` characters. ``Fwd:`` stays: a reply to a forward is
    still about it.
    """
    subject = decode_header_value(original_subject)
    while True:
        stripped = _REPLY_PREFIX.sub("", subject, count=1)
        if stripped == subject:
            break
        subject = stripped
    subject = header_text(subject)
    if not subject:
        return "Re:"
    reply = "Re: " + subject
    if len(reply) > MAX_SUBJECT_CHARS:
        reply = reply[: MAX_SUBJECT_CHARS - 1].rstrip() + "\u2026"
    return reply


def build_reply(
    original: IncomingMessage,
    *,
    from_address: str,
    from_name: str | None,
    to: str,
    subject: str,
    text: str,
    html: str,
    message_id_domain: str,
    message_id: str | None = None,
    now: datetime | None = None,
) -> tuple[EmailMessage, str]:
    """The reply to ``original``, threaded per RFC 5322, and its new Message-ID.

    In-Reply-To is the original's Message-ID and References its References plus that id (RFC 5322
    3.6.4), with malformed ids dropped; without a usable Message-ID the reply has no In-Reply-To
    and only the original's own References, if any (Gmail still files it by thread id, which the
    sending adapter passes). The message goes to ``to`` alone,
    carries ``Auto-Submitted: auto-replied`` (RFC 3834) and ``X-Auto-Response-Suppress: All`` (so
    Exchange does not answer it with an out-of-office), and has text and HTML alternatives.

    ``message_id`` is the reply's own Message-ID when the caller chose it up front (the ledger
    records it before sending); by default a new one in ``message_id_domain`` is made.

    Raises ValueError when ``from_address``, ``to`` or ``message_id_domain`` is not a plain ASCII
    address or domain: those come from our configuration and the sender check, not from the mail.
    """
    sender = _valid_addr_spec(from_address)
    recipient = _valid_addr_spec(to)
    if sender is None:
        raise ValueError(f"not a usable From address: {from_address!r}")
    if recipient is None:
        raise ValueError(f"not a usable To address: {to!r}")
    own_id = message_id or new_message_id(message_id_domain)
    parent_id = original_message_id(original)
    references = _references(original, parent_id)

    reply = EmailMessage(policy=REPLY_POLICY)
    name = header_text(from_name or "")
    reply["From"] = Address(display_name=name, addr_spec=sender.addr_spec)
    reply["To"] = Address(addr_spec=recipient.addr_spec)
    reply["Subject"] = reply_subject(subject)
    reply["Date"] = format_datetime(now or datetime.now(UTC))
    reply["Message-ID"] = own_id
    if parent_id is not None:
        reply["In-Reply-To"] = parent_id
    if references:
        reply["References"] = " ".join(references)
    reply["Auto-Submitted"] = "auto-replied"
    reply["X-Auto-Response-Suppress"] = "All"
    reply.set_content(text)
    reply.add_alternative(html, subtype="html")
    return reply, own_id


# --- Authentication-Results (RFC 8601) -------------------------------------------------------


@dataclass(frozen=True)
class AuthResult:
    """One ``method=result`` of an Authentication-Results header with its ``ptype.property``s."""

    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        """The value of property ``name`` (such as ``header.from``), case-insensitive."""
        wanted = name.lower()
        return next((value for key, value in self.properties if key == wanted), None)


@dataclass(frozen=True)
class AuthenticationResults:
    """A parsed Authentication-Results header: who verified, and what they found."""

    authserv_id: str
    results: tuple[AuthResult, ...]


# A name starts only where no name character precedes it: without that look-behind, findall tries a
# long run of name characters from each of its positions, and a 40 KB value takes a minute.
_AUTH_PAIR = re.compile(
    r'(?<![A-Za-z0-9_./-])([A-Za-z0-9_.-]+(?:/[0-9]+)?)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]+)'
)


def parse_authentication_results(value: str) -> AuthenticationResults | None:
    """Parse one Authentication-Results value; None when it has no authserv-id.

    Comments are removed first, so "spf=pass" inside a parenthesised explanation does not count.
    Linear in the length of the value, so a huge header cannot stall triage.
    """
    text = _without_comments(value)
    segments = text.split(";")
    head = segments[0].split()
    if not head or "=" in head[0]:
        return None
    results: list[AuthResult] = []
    for segment in segments[1:]:
        pairs = _AUTH_PAIR.findall(segment)
        if not pairs:
            continue
        method, result = pairs[0]
        properties = tuple(
            (key.lower(), raw.strip('"').lower()) for key, raw in pairs[1:] if "." in key
        )
        results.append(AuthResult(method.split("/")[0].lower(), result.lower(), properties))
    return AuthenticationResults(head[0].lower(), tuple(results))


def header_keyword(value: str) -> str:
    """The leading keyword of a structured value, lower-cased: ``Auto-Replied; x=y (c)`` gives
    ``auto-replied``, ``Multipart/Report; report-type=...`` gives ``multipart/report``."""
    return _without_comments(value).split(";", 1)[0].strip().lower()


def _without_comments(value: str) -> str:
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
        elif quoted:
            quoted = ch != '"'
            out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if depth == 0:
                out.append(" ")  # a comment separates what surrounds it
        elif depth == 0:
            quoted = ch == '"'
            out.append(ch)
    return "".join(out)


def domain_of(addr_spec: str) -> str | None:
    """The lower-cased domain of a plain ASCII addr-spec, or None when it is not one."""
    address = _valid_addr_spec(addr_spec)
    return address.domain.lower() if address is not None else None


def header_size(headers: Iterable[tuple[str, str]]) -> int:
    """Roughly how many bytes the headers take on the wire (UTF-8, with ``: `` and CRLF)."""
    return sum(
        len(name) + len(value.encode("utf-8", "surrogatepass")) + 4 for name, value in headers
    )
