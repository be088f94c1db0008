"""Choosing the Stripe customer a sender means: pure rules."""

from __future__ import annotations

from billing_responder.customers import choose_customer
from billing_responder.model import Customer


def customer(cid: str, email: str, created: int, *statuses: str) -> Customer:
    return Customer(id=cid, email=email, name=None, created=created,
                    subscription_statuses=statuses)


class TestChooseCustomer:
    def test_newest_record_with_a_live_subscription_wins(self) -> None:
        """Of several records, the newest with an active/trialing/past_due subscription is chosen."""
        records = [
            customer("cus_old_active", "a@x.test", 100, "active"),
            customer("cus_new_live", "a@x.test", 200, "past_due"),
            customer("cus_newest_canceled", "a@x.test", 300, "canceled"),
        ]
        chosen = choose_customer(records, "a@x.test")
        assert chosen is not None and chosen.id == "cus_new_live"

    def test_without_live_subscriptions_the_newest_wins(self) -> None:
        """When no record has a live subscription, the most recently created is chosen."""
        records = [customer("cus_a", "a@x.test", 100), customer("cus_b", "a@x.test", 200, "canceled")]
        chosen = choose_customer(records, "a@x.test")
        assert chosen is not None and chosen.id == "cus_b"

    def test_case_differences_still_match(self) -> None:
        """A record stored as Ada@X.test matches the sender ada@x.TEST."""
        chosen = choose_customer([customer("cus_a", "Ada@X.test", 1)], "ada@x.TEST")
        assert chosen is not None and chosen.id == "cus_a"

    def test_other_addresses_never_match(self) -> None:
        """Records whose email differs (dots, +tags, other people) are never chosen."""
        records = [customer("cus_dot", "a.b@gmail.com", 1), customer("cus_tag", "ab+x@gmail.com", 2)]
        assert choose_customer(records, "ab@gmail.com") is None

    def test_no_records_means_no_customer(self) -> None:
        """An empty lookup result chooses nobody."""
        assert choose_customer([], "a@x.test") is None
