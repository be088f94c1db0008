"""The narrow interfaces the pipeline needs from the outside world.

The pipeline depends on these Protocols only; ``gmail.py``, ``billing.py`` and ``ledger.py`` are
the real implementations, chosen in one place (``service.py``). Each method states the whole
contract the pipeline relies on, errors included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Protocol

from billing_responder.model import (
    Customer,
    Decision,
    IncomingMessage,
    LedgerEntry,
    MailboxChange,
    MessageRef,
    PortalSession,
)


class Mailbox(Protocol):
    """The Gmail mailbox being answered.

    Per-message methods raise ``TransientServiceError`` when the message should wait for the next
    cycle, and ``GmailAuthError``/``FatalServiceError`` when nothing can go on.
    """

    def address(self) -> str:
        """The mailbox's own address."""

    def send_as_addresses(self) -> list[str]:
        """Every address the mailbox sends as: mail from any of them is never answered."""

    def label_ids(self, names: Sequence[str], *, create: bool) -> dict[str, str | None]:
        """Label name → id; creates the missing ones when ``create``, else maps them to None."""

    def candidate_pages(self, query: str) -> Iterator[list[MessageRef]]:
        """Every message matching a Gmail search query, newest first, a page at a time (each
        page is asked for only when the previous one is used up)."""

    def history_id(self) -> int:
        """The mailbox's current history id: a later :meth:`changes_since` starts from it."""

    def changes_since(self, history_id: int) -> tuple[list[MailboxChange], int]:
        """Messages added or relabelled after ``history_id`` (oldest first, each once), and the
        history id to continue from next time.

        Raises ``HistoryExpiredError`` when the mailbox no longer keeps history that old.
        """

    def fetch(self, ref: MessageRef) -> IncomingMessage:
        """The message's headers and labels."""

    def send(self, raw: bytes, thread_id: str) -> str:
        """Send a raw RFC 822 message into a thread, at most once; the sent message's Gmail id.

        Not retried: on ``TransientServiceError`` the message may or may not have gone out.
        """

    def create_draft(self, raw: bytes, thread_id: str) -> str:
        """Leave a raw RFC 822 message as a draft in a thread, at most once; the Gmail id of the
        draft's message (which the thread and an ``rfc822msgid:`` search show, like a sent one).

        Not retried: on ``TransientServiceError`` the draft may or may not have been made.
        """

    def find_sent_reply(self, thread_id: str, message_id: str) -> str | None:
        """The Gmail id of our reply with this Message-ID (looked for in the thread first), sent
        or left as a draft."""

    def modify(
        self, message_id: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> None:
        """Add and remove labels (names of labels known to ``label_ids``, or system ids)."""


class Billing(Protocol):
    """Stripe, as far as answering billing email needs it."""

    def verify(self) -> None:
        """One authenticated call; raises ``FatalServiceError`` for a rejected key."""

    def find_customers(self, email: str) -> list[Customer]:
        """Customer records whose email may match ``email`` (the caller filters exactly)."""

    def create_portal_session(self, customer_id: str, *, idempotency_key: str) -> PortalSession:
        """A Billing Portal session; the same idempotency key never mints a second one."""


class Ledger(Protocol):
    """The durable record of what happened to each message (see ``ledger.py``).

    Every method raises ``StateError`` (fatal) when the record cannot be read or written.
    """

    def get(self, gmail_id: str) -> LedgerEntry | None:
        """The message's row, if it was ever decided."""

    def history_id(self) -> int | None:
        """The mailbox history id the last complete cycle reached (None: list the mailbox)."""

    def record_history_id(self, history_id: int | None) -> None:
        """Remember where the next cycle's history starts; None forgets it (a full sync next)."""

    def record_final(
        self, gmail_id: str, thread_id: str, decision: Decision, customer_id: str | None = None
    ) -> None:
        """A skip or escalation, complete."""

    def unfinished(self) -> list[LedgerEntry]:
        """Replies begun but not completed (sending or sent), oldest first."""

    def record_intent(
        self,
        gmail_id: str,
        thread_id: str,
        decision: Decision,
        *,
        customer_id: str,
        reply_message_id: str,
    ) -> None:
        """A reply about to be minted and sent, named by its own Message-ID."""

    def record_session(self, gmail_id: str, portal_session_id: str) -> None:
        """The portal session minted for the intended reply."""

    def record_sent(self, gmail_id: str, sent_gmail_id: str, *, drafted: bool = False) -> None:
        """Gmail accepted the reply: sent, or (``drafted``) left as a draft in the thread."""

    def record_done(self, gmail_id: str) -> None:
        """Labelled: nothing left to do."""

    def record_failure(self, gmail_id: str, thread_id: str, error: str) -> int:
        """A transient failure; the message waits for the next cycle. Returns its failure count."""

    def last_reply_to(self, sender: str) -> datetime | None:
        """When a reply last went to ``sender`` (case-insensitive), if ever."""

    def replied_in_thread(self, thread_id: str) -> bool:
        """Whether a reply was ever sent in this thread."""

    def replies_since(self, since: datetime) -> int:
        """How many replies were sent since ``since``."""

    def reply_in_doubt(self, sender: str, thread_id: str, other_than: str) -> bool:
        """Whether another message's reply to this sender or thread may have gone out unseen."""
