"""How much answering is allowed: age, per-thread, per-sender and global limits. Pure.

RFC 3834 (section 2) and Sieve vacation (RFC 5230, section 4.6) ask an auto-responder not to answer
the same sender again within a period, and practice adds two more guards: one automatic reply per
thread, ever, and a global ceiling that trips like a circuit breaker when something is wrong (a
loop with another robot, a flood, a forged campaign). A first run against years of unread mail
must not answer ancient messages either. Beside the breaker sits the daily send cap: Google
Workspace stops a mailbox that sends about 2,000 messages in 24 hours, and a mailbox that cannot
send cannot answer anyone, so the responder stops short of it and hands the rest to a person.

The counts come from the ledger (:class:`ReplyHistory`), so none of this resets on restart; the
breaker stays tripped until its one-hour window has passed.

A message whose handling keeps failing is not retried every cycle: after its n-th failure it
waits ``RETRY_BASE * 2**(n-1)`` (capped at an hour) before the next attempt, and after
``[limits] max_attempts`` failures it goes to a person. With the defaults that is about three
hours of failing before a message is escalated: long enough to ride out an outage, short enough
that a customer is not left waiting for a day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from billing_responder.model import Action

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
#: The wait after a message's first failure; it doubles with each further failure.
RETRY_BASE = timedelta(seconds=30)


@dataclass(frozen=True)
class Limits:
    """The configured limits (``[triage] max_age_days`` and ``[limits]``)."""

    max_age_days: float = 7.0
    per_sender_hours: float = 24.0
    max_replies_per_hour: int = 60
    max_attempts: int = 10
    max_sends_per_day: int = 2000


class ReplyHistory(Protocol):
    """What the ledger knows about replies already sent."""

    def last_reply_to(self, sender: str) -> datetime | None:
        """When a reply last went to ``sender`` (case-insensitive), if ever."""

    def replied_in_thread(self, thread_id: str) -> bool:
        """Whether a reply was ever sent in this thread."""

    def replies_since(self, since: datetime) -> int:
        """How many replies were sent since ``since``."""


def too_old(received: datetime, now: datetime, limits: Limits) -> str | None:
    """The reason a message is too old to answer automatically, or None."""
    if now - received <= timedelta(days=limits.max_age_days):
        return None
    days = (now - received).days
    return (
        f"too old to answer automatically: received {days} days ago "
        f"([triage] max_age_days = {limits.max_age_days:g})"
    )


def reply_blocked(
    history: ReplyHistory, sender: str, thread_id: str, now: datetime, limits: Limits
) -> tuple[Action, str] | None:
    """Why a reply that triage allowed must not go out now, and what to do instead; or None:
    :func:`sender_blocked`, then :func:`send_cap`."""
    blocked = sender_blocked(history, sender, thread_id, now, limits)
    if blocked is not None:
        return blocked
    cap = send_cap(history, now, limits)
    return None if cap is None else (Action.ESCALATE, cap.reason)


def sender_blocked(
    history: ReplyHistory, sender: str, thread_id: str, now: datetime, limits: Limits
) -> tuple[Action, str] | None:
    """Why this sender or thread must not get a reply now (it is skipped), or None.

    A thread already answered, or a sender answered within the per-sender period, is skipped:
    answering again is exactly what the limits exist to prevent.
    """
    if history.replied_in_thread(thread_id):
        return Action.SKIP, "rate-limited: this thread already got an automatic reply"
    last = history.last_reply_to(sender)
    period = timedelta(hours=limits.per_sender_hours)
    if last is not None and now - last < period:
        return Action.SKIP, (
            f"rate-limited: this sender got an automatic reply at {last:%Y-%m-%d %H:%M} UTC "
            f"(at most one per {limits.per_sender_hours:g} h, [limits] per_sender_hours)"
        )
    return None


@dataclass(frozen=True)
class SendCap:
    """A reached ceiling on replies: ``window`` is "hour" (the breaker) or "day"."""

    window: str
    reason: str


def send_cap(history: ReplyHistory, now: datetime, limits: Limits) -> SendCap | None:
    """The ceiling on replies a further reply would break, or None.

    Either way the message may well deserve an answer, but none may go out now: it is escalated.
    The caller checks this and records its own reply's intent as one step, so replies made at the
    same time cannot all slip under the same ceiling.
    """
    today = history.replies_since(now - DAY)
    if today >= limits.max_sends_per_day:
        return SendCap("day", (
            f"daily send cap: {today} automatic replies in the last 24 hours "
            f"([limits] max_sends_per_day = {limits.max_sends_per_day}); sending paused"
        ))
    sent = history.replies_since(now - HOUR)
    if sent >= limits.max_replies_per_hour:
        return SendCap("hour", (
            f"circuit breaker: {sent} automatic replies in the last hour "
            f"([limits] max_replies_per_hour = {limits.max_replies_per_hour}); sending paused"
        ))
    return None


def next_attempt(last_failure: datetime, failures: int) -> datetime:
    """When a message that failed ``failures`` times (last at ``last_failure``) may try again."""
    if failures <= 0:
        return last_failure
    wait: timedelta = min(RETRY_BASE * 2 ** min(failures - 1, 16), HOUR)
    return last_failure + wait
