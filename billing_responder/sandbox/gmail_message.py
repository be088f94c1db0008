"""One message in the Gmail emulator's mailbox: its parse, what search sees, how the API shows it.

The raw RFC 822 bytes are the truth; everything else (decoded headers, the search view, the
snippet) is derived once when the message arrives. Rendering follows the ``format`` parameter of
messages.get: ``minimal``, ``metadata``, ``full`` or ``raw``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Any, cast

from billing_responder.sandbox import gmail_query
from billing_responder.sandbox.gmail_api import b64url

_SNIPPET_LENGTH = 200
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv|vs|antw|tr)(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


@dataclass(frozen=True)
class StoredMessage:
    """A message as the mailbox holds it, for tests to inspect. ``message`` is a fresh parse."""

    id: str
    thread_id: str
    raw: bytes
    label_ids: frozenset[str]
    internal_date_ms: int
    history_id: int
    message: EmailMessage


@dataclass
class MailboxMessage:
    """A message in the mailbox; ``label_ids``, ``history_id`` and ``thread_id`` change."""

    id: str
    thread_id: str
    raw: bytes
    label_ids: set[str]
    internal_date_ms: int
    history_id: int
    parsed: EmailMessage
    decode_header_values: bool
    doc: gmail_query.SearchDoc  # label_ids and internal_date_ms are filled in per search
    snippet: str

    @classmethod
    def receive(
        cls,
        message_id: str,
        raw: bytes,
        *,
        label_ids: set[str],
        internal_date_ms: int,
        history_id: int,
        decode_header_values: bool,
    ) -> MailboxMessage:
        """Parse ``raw`` once and derive what search and rendering need."""
        parsed = parse(raw)
        body, attachment = _body_text(parsed)

        def values(name: str) -> tuple[str, ...]:
            return tuple(_decode_words(v) for k, v in parsed.raw_items() if k.lower() == name)

        doc = gmail_query.SearchDoc(
            subject=next(iter(values("subject")), ""),
            from_=values("from"),
            to=values("to"),
            cc=values("cc"),
            bcc=values("bcc"),
            body=body,
            label_ids=frozenset(),
            internal_date_ms=0,
            message_id=next(iter(values("message-id")), ""),
            has_attachment=attachment,
        )
        return cls(
            id=message_id,
            thread_id=message_id,
            raw=raw,
            label_ids=label_ids,
            internal_date_ms=internal_date_ms,
            history_id=history_id,
            parsed=parsed,
            decode_header_values=decode_header_values,
            doc=doc,
            snippet=html.escape(" ".join(body.split())[:_SNIPPET_LENGTH]),
        )

    def ref(self) -> dict[str, Any]:
        """The ``{id, threadId}`` listings use."""
        return {"id": self.id, "threadId": self.thread_id}

    def with_labels(self) -> dict[str, Any]:
        """The ``{id, threadId, labelIds}`` modify and history use."""
        return self.ref() | {"labelIds": sorted(self.label_ids)}

    def search_view(self) -> gmail_query.SearchDoc:
        """What a ``q`` query sees of this message now."""
        doc = self.doc
        return gmail_query.SearchDoc(
            doc.subject, doc.from_, doc.to, doc.cc, doc.bcc, doc.body,
            frozenset(self.label_ids), self.internal_date_ms, doc.message_id, doc.has_attachment,
        )  # fmt: skip

    def referenced_ids(self) -> set[str]:
        """Message-IDs named in In-Reply-To and References, without angle brackets."""
        refs = " ".join(
            v for k, v in self.parsed.raw_items() if k.lower() in ("in-reply-to", "references")
        )
        return {bare_message_id(m) for m in re.findall(r"<[^<>\s]+>", _unfold(refs))}

    def snapshot(self) -> StoredMessage:
        """A frozen copy for tests."""
        return StoredMessage(
            self.id,
            self.thread_id,
            self.raw,
            frozenset(self.label_ids),
            self.internal_date_ms,
            self.history_id,
            parse(self.raw),
        )

    def resource(self, fmt: str, metadata_headers: Sequence[str] = ()) -> dict[str, Any]:
        """The Message resource messages.get returns for ``format=fmt``."""
        resource: dict[str, Any] = self.with_labels() | {
            "snippet": self.snippet,
            "sizeEstimate": len(self.raw),
            "historyId": str(self.history_id),
            "internalDate": str(self.internal_date_ms),
        }
        if fmt == "raw":
            resource["raw"] = b64url(self.raw)
        elif fmt == "metadata":
            names = {n.lower() for n in metadata_headers}
            headers = [h for h in self._headers(self.parsed) if not names or h[0].lower() in names]
            resource["payload"] = {
                "mimeType": self.parsed.get_content_type(),
                "headers": [{"name": k, "value": v} for k, v in headers],
            }
        elif fmt == "full":
            resource["payload"] = self._part(self.parsed, "")
        return resource

    def _headers(self, part: Message) -> list[tuple[str, str]]:
        decode = _decode_words if self.decode_header_values else _unfold
        return [(name, decode(value)) for name, value in part.raw_items()]

    def _part(self, part: Message, part_id: str) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "partId": part_id,
            "mimeType": part.get_content_type(),
            "filename": part.get_filename() or "",
            "headers": [{"name": k, "value": v} for k, v in self._headers(part)],
        }
        if part.is_multipart():
            prefix = f"{part_id}." if part_id else ""
            children = cast(list[Message], part.get_payload())
            resource["body"] = {"size": 0}
            resource["parts"] = [self._part(c, f"{prefix}{n}") for n, c in enumerate(children)]
        else:
            data = cast(bytes, part.get_payload(decode=True) or b"")
            resource["body"] = {"size": len(data)} | ({"data": b64url(data)} if data else {})
        return resource


def parse(raw: bytes) -> EmailMessage:
    """``raw`` as an EmailMessage (policy.default)."""
    return BytesParser(policy=policy.default).parsebytes(raw)


def normalised_subject(subject: str) -> str:
    """A subject as Gmail compares them for threading: reply prefixes and case dropped."""
    return " ".join(_REPLY_PREFIX.sub("", subject).split()).casefold()


def bare_message_id(value: str) -> str:
    """A Message-ID without its angle brackets."""
    return value.strip().strip("<>").strip()


def _unfold(value: str) -> str:
    """A raw header value on one line, its 8-bit bytes read as UTF-8 (as Gmail reads them)."""
    text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return re.sub(r"\r?\n(?=[ \t])", "", text)


def _decode_words(value: str) -> str:
    """A raw header value unfolded and, like Gmail, with RFC 2047 encoded words decoded."""
    unfolded = _unfold(value)
    try:
        return str(make_header(decode_header(unfolded)))
    except (LookupError, ValueError, UnicodeError):  # an unknown charset: Gmail shows it raw
        return unfolded


def _text_of(part: Message) -> str:
    try:
        content = cast(EmailMessage, part).get_content()
    except (LookupError, KeyError, ValueError):
        content = cast(bytes, part.get_payload(decode=True) or b"").decode("utf-8", "replace")
    text = content if isinstance(content, str) else ""
    if part.get_content_subtype() == "html":
        text = html.unescape(re.sub(r"(?s)<(style|script).*?</\1>|<[^>]+>", " ", text))
    return text


def _body_text(parsed: EmailMessage) -> tuple[str, bool]:
    """The readable text of a message (plain parts preferred) and whether it has an attachment."""
    plain: list[str] = []
    rich: list[str] = []
    attachment = False
    for part in parsed.walk():
        if part.is_multipart():
            continue
        if part.get_filename() or part.get_content_disposition() == "attachment":
            attachment = True
        elif part.get_content_maintype() == "text":
            (plain if part.get_content_subtype() == "plain" else rich).append(_text_of(part))
    return " ".join(plain or rich), attachment
