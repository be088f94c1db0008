"""Which Stripe customer a sender is: pure matching and choosing, no I/O."""

from __future__ import annotations

from collections.abc import Iterable

from billing_responder.mail import same_address
from billing_responder.model import Customer


def choose_customer(candidates: Iterable[Customer], sender: str) -> Customer | None:
    """The customer record a sender most likely means, or None.

    Only records whose email equals the sender (case-insensitively) count; Gmail dots and +tags
    are deliberately not normalised (``a.b+x@gmail.com`` is another record than ``ab@gmail.com``).
    Of several, the most recently created one with an active, trialing or past_due subscription
    wins; if none has one, the most recently created.
    """
    matching = {c.id: c for c in candidates if same_address(c.email, sender)}
    if not matching:
        return None
    newest_first = sorted(matching.values(), key=lambda c: (c.created, c.id), reverse=True)
    for customer in newest_first:
        if customer.has_live_subscription:
            return customer
    return newest_first[0]
