"""The Stripe side: an adapter over ``stripe.StripeClient`` (the only module that imports stripe).

:class:`StripeBilling` looks customers up by email and mints Billing Portal sessions, mapping
stripe-python's exceptions onto the project's error tree:

- authentication and permission errors → :class:`FatalServiceError` (the key is wrong for good);
- rate limits, connection errors, 5xx, anything Stripe marks ``Stripe-Should-Retry: true`` →
  retried here, then :class:`TransientServiceError` (the message waits for the next cycle);
- other API errors about one request → :class:`TransientServiceError` too, with Stripe's message,
  so a message is never marked handled when no link was minted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import stripe
from stripe.params.billing_portal import SessionCreateParams

from billing_responder.errors import (
    FatalServiceError,
    IdempotencyConflictError,
    ServiceUnavailableError,
    TransientServiceError,
)
from billing_responder.governor import TokenBucket, Unlimited
from billing_responder.model import Customer, PortalSession
from billing_responder.retry import RetryPolicy, parse_retry_after

log = logging.getLogger(__name__)
T = TypeVar("T")


def _is_retryable(exc: BaseException) -> bool:
    if not isinstance(exc, stripe.StripeError):
        return False
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return False
    should_retry = (exc.headers or {}).get("stripe-should-retry")
    if should_retry is not None:
        return should_retry == "true"
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError):
        return True
    return exc.http_status is not None and exc.http_status >= 500


def _retry_after(exc: BaseException) -> float | None:
    if isinstance(exc, stripe.StripeError):
        return parse_retry_after((exc.headers or {}).get("retry-after"))
    return None


#: How long every worker pauses after a 429 that came without a Retry-After.
_DEFAULT_BACK_OFF = 1.0

#: Stripe: stripe-python does not retry a plain 429 itself, so every retry happens here.
STRIPE_RETRY = RetryPolicy("Stripe", retryable=_is_retryable, retry_after=_retry_after)


def key_mode(api_key: str) -> str:
    """``test`` or ``live``, from the key's prefix; the key itself is never shown."""
    return "live" if "_live_" in api_key else "test"


def key_kind(api_key: str) -> str:
    """``restricted`` (``rk_...``, the recommended kind) or ``secret`` (``sk_...``)."""
    return "restricted" if api_key.startswith("rk_") else "secret"


@dataclass(frozen=True)
class PortalConfiguration:
    """A Billing Portal configuration, as far as going live depends on it."""

    id: str
    active: bool
    is_default: bool


class StripeBilling:
    """Stripe, through the real ``stripe.StripeClient``."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str = "",
        return_url: str,
        portal_configuration: str = "",
        locale: str = "",
        timeout_seconds: float = 30.0,
        governor: TokenBucket | Unlimited | None = None,
        search_governor: TokenBucket | Unlimited | None = None,
    ) -> None:
        base_addresses: Any = {"api": api_base} if api_base else None
        self._http = stripe.RequestsClient(timeout=timeout_seconds)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses=base_addresses,
            # Retries are ours (one policy, visible in logs), not the library's hidden ones.
            max_network_retries=0,
            http_client=self._http,
        )
        #: Stripe's rate limits, shared by every worker: all requests, and Search's own on top.
        self._governor = governor or Unlimited()
        self._search_governor = search_governor or Unlimited()
        self._return_url = return_url
        self._configuration = portal_configuration
        self._locale = locale

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()  # type: ignore[no-untyped-call]

    def verify(self) -> None:
        """Make one cheap authenticated call, so a wrong key fails the start, not a reply."""
        try:
            self._call(lambda: self._client.v1.customers.list(params={"limit": 1}))
        except TransientServiceError as exc:
            raise ServiceUnavailableError("Stripe", str(exc).removeprefix("Stripe: ")) from None

    def verify_subscriptions(self) -> None:
        """One cheap call that needs the subscription read permission customer lookups use."""
        try:
            self._call(lambda: self._client.v1.subscriptions.list(params={"limit": 1}))
        except TransientServiceError as exc:
            raise ServiceUnavailableError("Stripe", str(exc).removeprefix("Stripe: ")) from None

    def find_customers(self, email: str) -> list[Customer]:
        """Every customer whose email may equal ``email`` regardless of case.

        The list endpoint's email filter is exact and case-sensitive, and Search is eventually
        consistent (new customers appear after a minute or more), so neither alone is enough:
        list by the address as written and lower-cased (fresh records), and search (records
        stored with other capitalisation). The caller filters and chooses.
        """
        found: dict[str, Customer] = {}
        for variant in dict.fromkeys((email, email.lower())):
            page = self._call(
                lambda v=variant: self._client.v1.customers.list(  # type: ignore[misc]
                    params={"email": v, "limit": 100, "expand": ["data.subscriptions"]}
                )
            )
            found.update((c.id, _customer(c)) for c in page.data)
        query = 'email:"{}"'.format(email.replace("\\", "\\\\").replace('"', '\\"'))
        try:
            result = self._call(
                lambda: self._client.v1.customers.search(
                    params={"query": query, "limit": 100, "expand": ["data.subscriptions"]}
                ),
                search=True,
            )
        except TransientServiceError as exc:
            if not found:
                raise
            # Search only adds records stored with other capitalisation; what the exact lookup
            # found is worth answering with rather than deferring the message.
            log.warning("customer search failed, using the exact-match results: %s", exc)
            return list(found.values())
        found.update((c.id, _customer(c)) for c in result.data)
        return list(found.values())

    def customer(self, customer_id: str) -> Customer:
        """The customer ``customer_id``; a missing or deleted one is fatal, with Stripe's words."""

        def retrieve() -> Any:
            try:
                return self._client.v1.customers.retrieve(customer_id)
            except stripe.InvalidRequestError as exc:
                if exc.code != "resource_missing":
                    raise
                raise FatalServiceError("Stripe", str(exc.user_message or exc)) from None

        found = self._call(retrieve)
        if getattr(found, "deleted", False):
            raise FatalServiceError("Stripe", f"customer {customer_id} has been deleted")
        return _customer(found)

    def portal_configuration(self) -> PortalConfiguration | None:
        """The portal configuration sessions will use: ``[stripe] portal_configuration``, else
        the account's default; None when there is none (an unknown id, or portal settings never
        saved in the Dashboard, in which case Stripe refuses to create sessions)."""
        configurations = self._client.v1.billing_portal.configurations

        def find() -> Any:
            if not self._configuration:
                page = configurations.list(params={"is_default": True, "limit": 1})
                return page.data[0] if page.data else None
            try:
                return configurations.retrieve(self._configuration)
            except stripe.InvalidRequestError as exc:
                if exc.code == "resource_missing":
                    return None
                raise

        found = self._call(find)
        if found is None:
            return None
        return PortalConfiguration(
            id=str(found.id), active=bool(found.active), is_default=bool(found.is_default)
        )

    def create_portal_session(self, customer_id: str, *, idempotency_key: str) -> PortalSession:
        """A fresh Billing Portal session; the same key never mints a second one."""
        params: SessionCreateParams = {"customer": customer_id, "return_url": self._return_url}
        if self._configuration:
            params["configuration"] = self._configuration
        if self._locale:
            params["locale"] = cast(Any, self._locale)
        session = self._call(
            lambda: self._client.v1.billing_portal.sessions.create(
                params=params, options={"idempotency_key": idempotency_key}
            )
        )
        return PortalSession(id=session.id, url=session.url)

    def _call(self, fn: Callable[[], T], *, search: bool = False) -> T:
        def attempt() -> T:
            if search:
                self._search_governor.take(1)
            self._governor.take(1)
            try:
                return fn()
            except stripe.RateLimitError as exc:
                # Every worker pauses, not only the one that met it.
                told = _retry_after(exc)
                pause = _DEFAULT_BACK_OFF if told is None else told
                (self._search_governor if search else self._governor).back_off(pause)
                raise

        try:
            return STRIPE_RETRY.call(attempt)
        except stripe.AuthenticationError as exc:
            raise FatalServiceError(
                "Stripe", f"the API key was rejected: {exc.user_message or exc}"
            ) from None
        except stripe.PermissionError as exc:
            raise FatalServiceError(
                "Stripe",
                f"the API key lacks a permission (see README: Stripe key): "
                f"{exc.user_message or exc}",
            ) from None
        except stripe.IdempotencyError as exc:
            raise IdempotencyConflictError(str(exc.user_message or exc)) from None
        except stripe.StripeError as exc:
            status = exc.http_status or "no response"
            raise TransientServiceError(
                "Stripe", f"{type(exc).__name__} ({status}): {exc.user_message or exc}"
            ) from None


def _customer(obj: Any) -> Customer:
    data = obj.to_dict()  # StripeObject is no dict; a plain copy reads the same at any depth
    subscriptions = data.get("subscriptions")
    statuses: tuple[str, ...] = ()
    if isinstance(subscriptions, dict):
        statuses = tuple(str(s.get("status")) for s in subscriptions.get("data", []))
    return Customer(
        id=str(data["id"]),
        email=str(data.get("email") or ""),
        name=data.get("name"),
        created=int(data.get("created") or 0),
        subscription_statuses=statuses,
    )
