"""Which Stripe customer a sender is: pure matching and choosing, no I/O."""

from __future__ import annotations

from collections.abc import Iterable

from billing_responder.model import Customer


def same_address(a: str, b: str) -> bool:
    """Whether two addresses are the same mailbox for lookup purposes.

    Case-insensitive on the whole address (mail systems treat local parts case-insensitively in
    practice, while Stripe's email filter does not). Gmail dots and +tags are deliberately NOT
    normalised: ``a.b+x@gmail.com`` is a different customer record from ``ab@gmail.com``.
    """
    return a.strip().casefold() == b.strip().casefold()


def choose_customer(candidates: Iterable[Customer], sender: str) -> Customer | None:
    """The customer record a sender most likely means, or None.

    Only records whose email equals the sender (case-insensitively) count. Of several, the most
    recently created one with an active, trialing or past_due subscription wins; if none has one,
    the most recently created.
    """
    matching = {c.id: c for c in candidates if same_address(c.email, sender)}
    if not matching:
        return None
    newest_first = sorted(matching.values(), key=lambda c: (c.created, c.id), reverse=True)
    for customer in newest_first:
        if customer.has_live_subscription:
            return customer
    return newest_first[0]
