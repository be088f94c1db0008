"""`once --dry-run --review DIR`: a page to review a cycle's would-be replies before going live.

For each would-be reply, ``NNN-<gmail id>.eml`` (the whole message as it would be sent, with the
dry-run placeholder for the portal link) and ``NNN-<gmail id>.html`` (its headers, the HTML part in
a sandboxed frame, and the text part); then ``index.html``: every message of the cycle with its
decision and reasons, and the text of each reply, counts at the top. NNN is the message's place in
the cycle, as numbered on the index.

Everything on the pages comes from mail headers and Stripe, and is treated as hostile: the
templates (``templates/review/``) are autoescaped, and every page carries a Content-Security-Policy
that allows no script, no remote content and no form, so a subject or customer name can only ever
show as text. Addresses are shown in full: the pages are for the mailbox's owner. The folder is
created private (0700) and the files 0600, like the ledger: they hold customers' addresses.

DIR may be new, empty, or an earlier review (it holds the ``.billing-responder-review`` marker):
the earlier review's files are replaced, anything else in it is left alone. Any other non-empty
folder is refused before the cycle starts, so a mistyped path never overwrites someone's files.
"""

from __future__ import annotations

import email.policy
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import jinja2

from billing_responder.errors import UsageError
from billing_responder.pipeline import DRY_RUN_PORTAL_URL, CycleReport, Outcome, Status
from billing_responder.render import default_templates_dir

MARKER = ".billing-responder-review"
INDEX = "index.html"
#: The files a review writes, and so the only ones a later review replaces.
_OWN_FILE = re.compile(r"(\d{3,}-[A-Za-z0-9_-]+\.(eml|html)|index\.html)")
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")
#: The reply's headers a reviewer looks at, in this order.
SHOWN_HEADERS = (
    "From", "To", "Subject", "Date", "Message-ID", "In-Reply-To", "References", "Auto-Submitted",
)

#: How each outcome looks (its CSS class), by status value; a status not listed looks "handled".
#: Drafts (``[reply] mode = "draft"``) are replies that wait for a person to send them.
_KIND = {
    "replied": "reply",
    "would reply": "reply",
    "drafted": "reply",
    "would draft": "reply",
    "skipped": "skip",
    "escalated": "escalate",
    "would escalate": "escalate",
    "deferred": "deferred",
    "waiting to retry": "deferred",
}


@dataclass(frozen=True)
class Item:
    """One message of the cycle as the pages show it: plain values, so templates call nothing."""

    number: int
    status: str
    kind: str  # CSS class: reply, skip, escalate, deferred, handled
    gmail_id: str
    thread_id: str
    sender: str | None
    subject: str
    reasons: tuple[str, ...]
    headline: str  # the deciding reason (or the error): the overview's "why"
    error: str | None
    customer_id: str | None
    recipient: str | None
    reply_subject: str | None
    reply_text: str | None
    eml_file: str | None
    preview_file: str | None


@dataclass(frozen=True)
class Count:
    """How many messages ended one way."""

    status: str
    kind: str
    number: int


class ReviewWriter:
    """Collects a dry-run cycle's outcomes and writes DIR/index.html plus one .eml/.html each."""

    def __init__(self, folder: Path, *, templates_dir: Path | None = None) -> None:
        self.folder = folder
        self._outcomes: list[Outcome] = []
        self._items: list[Item] = []
        templates = templates_dir or default_templates_dir() / "review"
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates)),
            autoescape=True,  # every page is HTML, and every value in it is someone else's text
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        # Loaded now, so a damaged installation fails before the cycle, not after it.
        self._index = self._env.get_template("index.html.j2")
        self._message = self._env.get_template("message.html.j2")
        self._prepare()

    def _prepare(self) -> None:
        where = f"--review {self.folder}"
        try:
            if self.folder.exists() and not self.folder.is_dir():
                raise UsageError(f"{where}: exists and is not a folder")
            if self.folder.is_dir():
                names = {p.name for p in self.folder.iterdir()}
                if names and MARKER not in names:
                    raise UsageError(
                        f"{where}: the folder is not empty and holds no earlier review; name a new"
                        " or empty folder (nothing in it was changed)"
                    )
                for name in names:
                    if _OWN_FILE.fullmatch(name):
                        (self.folder / name).unlink()
            else:
                self.folder.mkdir(mode=0o700, parents=True)
            _write_private(
                self.folder / MARKER,
                b"Written by billing-responder once --dry-run --review: the next review into this"
                b" folder replaces its index.html and NNN-*.eml/.html files.\n",
            )
        except OSError as exc:
            raise UsageError(f"{where}: {exc.strerror or exc}") from None

    def add(self, outcome: Outcome) -> None:
        """Record one outcome; :meth:`finish` writes it."""
        self._outcomes.append(outcome)

    def _write_item(self, outcome: Outcome) -> None:
        """Number one outcome, and write its reply files, for a would-be reply."""
        number = len(self._items) + 1
        decision = outcome.decision
        reasons = decision.reasons if decision is not None else ()
        stem = f"{number:03d}-{_UNSAFE_IN_NAME.sub('_', outcome.ref.id)}"
        has_reply = outcome.dry_run_message is not None
        item = Item(
            number=number,
            status=outcome.status.value,
            kind=_KIND.get(outcome.status.value, "handled"),
            gmail_id=outcome.ref.id,
            thread_id=outcome.ref.thread_id,
            sender=decision.sender if decision is not None else None,
            subject=decision.subject if decision is not None else "",
            reasons=reasons,
            # Later steps append the reason that settled it: the last is the one to show first.
            headline=outcome.error or (reasons[-1] if reasons else ""),
            error=outcome.error,
            customer_id=outcome.customer_id,
            recipient=outcome.recipient,
            reply_subject=outcome.reply_subject,
            reply_text=outcome.dry_run_text,
            eml_file=f"{stem}.eml" if has_reply else None,
            preview_file=f"{stem}.html" if has_reply else None,
        )
        if outcome.dry_run_message is not None and item.eml_file and item.preview_file:
            message = BytesParser(policy=email.policy.default).parsebytes(outcome.dry_run_message)
            page = self._message.render(
                item=item,
                headers=_shown_headers(message),
                html=outcome.dry_run_html or _html_part(message),
            )
            self._write(item.eml_file, outcome.dry_run_message)
            self._write(item.preview_file, page.encode("utf-8"))
        self._items.append(item)

    def finish(self, report: CycleReport) -> Path:
        """Write the files, numbered in arrival order (workers finish messages in any order),
        and the index page; its path."""
        for outcome in sorted(self._outcomes, key=_arrival):
            self._write_item(outcome)
        counts = [
            Count(status.value, _KIND.get(status.value, "handled"), report.count(status))
            for status in Status
            if report.count(status)
        ]
        page = self._index.render(
            items=self._items,
            counts=counts,
            summary=report.summary(),
            generated=f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S}",
            placeholder_url=DRY_RUN_PORTAL_URL,
        )
        self._write(INDEX, page.encode("utf-8"))
        return (self.folder / INDEX).absolute()

    def _write(self, name: str, data: bytes) -> None:
        try:
            _write_private(self.folder / name, data)
        except OSError as exc:
            raise UsageError(f"--review {self.folder}: {name}: {exc.strerror or exc}") from None


def _arrival(outcome: Outcome) -> tuple[bool, int, str]:
    """Oldest first; outcomes of messages not fetched (already handled...) last."""
    return (outcome.received_ms is None, outcome.received_ms or 0, outcome.ref.id)


def _write_private(path: Path, data: bytes) -> None:
    # Private from the first byte, and never through a link someone left in the folder.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _shown_headers(message: EmailMessage) -> list[tuple[str, str]]:
    """The reply's headers worth reviewing, decoded, as (name, value) in a fixed order."""
    return [(name, str(message[name])) for name in SHOWN_HEADERS if message[name] is not None]


def _html_part(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("html",))
    return body.get_content() if isinstance(body, EmailMessage) else ""
