"""The values that travel through the pipeline: plain, frozen, free of any client library."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MessageRef:
    """A message as a Gmail listing names it: enough to fetch it."""

    id: str
    thread_id: str


@dataclass(frozen=True)
class MailboxChange:
    """A message that was added or relabelled, as the mailbox's history names it.

    ``labels`` are the message's labels after its latest change in the window (system labels by
    id, the responder's own labels by name); None when the history did not say.
    """

    ref: MessageRef
    labels: frozenset[str] | None


@dataclass(frozen=True)
class IncomingMessage:
    """The headers of one received message, as the mail system delivered them.

    ``headers`` keeps every header in order, name and raw value (RFC 2047 encoded words are not
    decoded here), so triage sees repeated headers such as several ``Authentication-Results``.
    """

    id: str
    thread_id: str
    label_ids: frozenset[str]
    headers: tuple[tuple[str, str], ...]
    internal_date_ms: int = 0

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in message order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def get(self, name: str) -> str | None:
        """The first value of header ``name``, or None when it is absent."""
        values = self.get_all(name)
        return values[0] if values else None

    def has(self, name: str) -> bool:
        """Whether header ``name`` is present at all."""
        return bool(self.get_all(name))

    def names(self) -> Iterable[str]:
        """The header names, lower-cased, in message order."""
        return (key.lower() for key, _ in self.headers)


class Action(enum.Enum):
    """What triage decided to do with a message."""

    REPLY = "reply"
    SKIP = "skip"
    ESCALATE = "escalate"


@dataclass(frozen=True)
class Decision:
    """The outcome of triage: an action and the human-readable reasons for it."""

    action: Action
    reasons: tuple[str, ...]
    sender: str | None = None
    subject: str = ""

    def as_json(self) -> dict[str, object]:
        """The shape `billing-responder explain` prints."""
        return {"action": self.action.value, "reasons": list(self.reasons)}


#: Subscription statuses that make a customer record the one a sender most likely means.
LIVE_SUBSCRIPTION_STATUSES = frozenset({"active", "trialing", "past_due"})


@dataclass(frozen=True)
class Customer:
    """A Stripe customer as far as choosing and greeting one needs."""

    id: str
    email: str
    name: str | None
    created: int
    subscription_statuses: tuple[str, ...] = field(default=())

    @property
    def has_live_subscription(self) -> bool:
        """Whether any subscription is active, trialing or past due."""
        return any(s in LIVE_SUBSCRIPTION_STATUSES for s in self.subscription_statuses)


@dataclass(frozen=True)
class PortalSession:
    """A minted Billing Portal session. ``url`` is a bearer credential: never log or store it."""

    id: str
    url: str

    def __repr__(self) -> str:
        return f"PortalSession(id={self.id!r}, url=<redacted>)"


# States of a message's ledger row; see ledger.py for the protocol.
SENDING = "sending"  # a reply was decided; its own Message-ID is recorded; it may be out
SENT = "sent"  # Gmail accepted the reply
DONE = "done"  # nothing is left to do for this message


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger knows about one message."""

    gmail_id: str
    thread_id: str
    sender: str | None
    subject: str
    action: str
    reasons: tuple[str, ...]
    state: str
    customer_id: str | None
    portal_session_id: str | None
    reply_message_id: str | None
    sent_gmail_id: str | None
    failures: int
    last_error: str | None
    created_at: str
    updated_at: str
