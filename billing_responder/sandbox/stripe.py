"""An emulator of the part of the Stripe API billing-responder uses, served over real HTTP.

``stripe.StripeClient(key, base_addresses={"api": emulator.url})`` talks to it unchanged. It keeps
the behaviours an integration has to survive, as Stripe documents them for API version
2026-10-28.endive:

* ``GET /v1/customers?email=`` is an exact, case-sensitive filter, newest first, paged with
  ``starting_after``/``ending_before``. Since 2020-08-27 a customer has no ``subscriptions`` field
  unless asked for with ``expand[]=data.subscriptions`` (then: all but canceled ones).
* ``GET /v1/customers/search`` matches ``email:"x"`` case-insensitively (see :mod:`.stripe_query`)
  but only once the search index has caught up. Stripe says data is searchable "in under 1 minute"
  normally and up to an hour behind during outages; here the lag is ``search_delay_seconds``
  (0 unless set). Search allows 20 read operations per second, then answers 429 ``rate_limit``.
* A POST whose ``Idempotency-Key`` was already used with the same API key replays the first answer
  (``Idempotent-Replayed: true``), or is refused with an ``idempotency_error`` if its parameters or
  endpoint differ. Only successes and ``resource_missing`` refusals are remembered: Stripe keeps no
  result for requests whose parameters fail validation, so those may be retried with the key.
* Every answer carries a ``Request-Id``; errors have Stripe's body shape and status codes, so
  stripe-python raises the exception classes it raises against Stripe. Injected faults too.

Seed state with :meth:`StripeEmulator.add_customer`; observe with
:meth:`StripeEmulator.portal_sessions` and :meth:`StripeEmulator.writes`.
"""

from __future__ import annotations

import html
import re
import secrets
import string
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from billing_responder.sandbox._http import EmulatorServer, Fault, RecordedRequest, Response
from billing_responder.sandbox.stripe_query import (
    CUSTOMER_FIELDS,
    Query,
    StripeAPIError,
    created_ok,
    decode_params,
    form_booleans,
    invalid_choice,
    is_url,
    missing,
    no_such,
    page_offset,
    page_token,
    parse,
    read_bool,
    read_expand,
    read_limit,
)

API_VERSION = "2026-10-28.endive"
DEFAULT_API_KEY = "sk_test_sandbox"
ACCOUNT_ID = "acct_1SandboxEmulator"
SEARCH_RATE_LIMIT = 20  # read operations per second, all search endpoints together (Stripe's)
# fmt: off
SUBSCRIPTION_STATUSES = frozenset({
    "active", "trialing", "past_due", "canceled", "unpaid", "incomplete", "incomplete_expired",
    "paused",
})
PORTAL_LOCALES = frozenset({
    "auto", "bg", "cs", "da", "de", "el", "en", "en-AU", "en-CA", "en-GB", "en-IE", "en-IN",
    "en-NZ", "en-SG", "es", "es-419", "et", "fi", "fil", "fr", "fr-CA", "hr", "hu", "id", "it",
    "ja", "ko", "lt", "lv", "ms", "mt", "nb", "nl", "pl", "pt", "pt-BR", "ro", "ru", "sk", "sl",
    "sv", "th", "tr", "vi", "zh", "zh-HK", "zh-TW",
})
# fmt: on
RATE_LIMIT_MESSAGE = (
    "Request rate limit exceeded. You can learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
_ALNUM = string.ascii_letters + string.digits

# Each endpoint: method, path, handler, the restricted-key permission it needs (named like
# Stripe's ``rak_*`` permissions) and the parameters it accepts; any other is parameter_unknown.
# fmt: off
_ENDPOINTS = (
    ("GET", r"/v1/customers/search", "_search_customers", "rak_customer_read",
     "expand limit page query"),
    ("GET", r"/v1/customers", "_list_customers", "rak_customer_read",
     "created email ending_before expand limit starting_after test_clock"),
    ("POST", r"/v1/customers", "_create_customer", "rak_customer_write",
     "address balance business_name cash_balance description email expand individual_name "
     "invoice_prefix invoice_settings metadata name next_invoice_sequence payment_method phone "
     "preferred_locales shipping source tax tax_exempt tax_id_data test_clock validate"),
    ("GET", r"/v1/customers/(cus_\w+)", "_retrieve_customer", "rak_customer_read", "expand"),
    ("GET", r"/v1/subscriptions", "_list_subscriptions", "rak_subscription_read",
     "automatic_tax collection_method created current_period_end current_period_start customer "
     "customer_account ending_before expand limit plan price starting_after status test_clock"),
    ("POST", r"/v1/billing_portal/sessions", "_create_session", "rak_billing_portal_write",
     "after_expiration configuration customer customer_account expand flow_data locale "
     "on_behalf_of return_url"),
    ("GET", r"/v1/billing_portal/configurations", "_list_configurations",
     "rak_billing_portal_read", "active ending_before expand is_default limit starting_after"),
    ("GET", r"/v1/billing_portal/configurations/(bpc_\w+)", "_retrieve_configuration",
     "rak_billing_portal_read", "expand"),
    ("POST", r"/v1/billing_portal/configurations", "_create_configuration",
     "rak_billing_portal_write",
     "business_profile default_return_url expand features login_page metadata name"),
)
# fmt: on


@dataclass(frozen=True)
class PortalSession:
    """A billing portal session created through the API (an idempotent replay creates none)."""

    id: str
    customer: str
    url: str
    return_url: str | None
    configuration: str
    locale: str | None
    idempotency_key: str | None
    created: int


@dataclass(frozen=True)
class _Endpoint:
    method: str
    path: re.Pattern[str]
    handler: Callable[[_Call], dict[str, Any]]
    permission: str
    params: frozenset[str]


@dataclass(frozen=True)
class _Call:
    params: dict[str, Any]
    args: tuple[str, ...]  # groups captured from the path
    idempotency_key: str | None


@dataclass(frozen=True)
class _Remembered:
    path: str
    params: dict[str, Any]
    response: Response


class StripeEmulator(EmulatorServer):
    """Customers, subscriptions and billing portal sessions behind Stripe's /v1 API."""

    name = "stripe-emulator"

    def __init__(
        self,
        *,
        api_keys: Collection[str] = (DEFAULT_API_KEY,),
        restricted_keys: Mapping[str, Collection[str]] | None = None,
        search_delay_seconds: float = 0.0,
        search_rate_limit: int = SEARCH_RATE_LIMIT,
        clock: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
    ) -> None:
        """Bind ``host:port`` (0 picks a free port); nothing is served until :meth:`start`.

        Keys in ``api_keys`` may do everything; each key of ``restricted_keys`` (``rk_test_...``)
        only what its permissions allow, e.g. ``{"rak_customer_read", "rak_billing_portal_write"}``
        (a write permission includes the read). ``search_delay_seconds``, ``search_rate_limit``
        and ``clock`` are attributes a test may change; :meth:`reset` restores them.
        """
        super().__init__(host=host, port=port, latency=latency)
        self._api_keys = frozenset(api_keys)
        self._restricted = {key: frozenset(perms) for key, perms in (restricted_keys or {}).items()}
        self._defaults = (search_delay_seconds, search_rate_limit, clock)
        self.search_delay_seconds, self.search_rate_limit, self.clock = self._defaults
        self._endpoints = [
            _Endpoint(method, re.compile(path), getattr(self, handler), perm, frozenset(ps.split()))
            for method, path, handler, perm, ps in _ENDPOINTS
        ]
        self._init_state()

    def _init_state(self) -> None:
        self._customers: dict[str, dict[str, Any]] = {}
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._configurations: dict[str, dict[str, Any]] = {}
        self._sessions: list[PortalSession] = []
        self._session_pages: dict[str, dict[str, Any]] = {}  # URL path -> session
        self._rank: dict[str, tuple[int, int]] = {}  # id -> (created, sequence): list order
        self._index: dict[str, list[tuple[float, dict[str, Any]]]] = {}  # (visible at, snapshot)
        # Lookups that would otherwise scan every object (a 10,000-customer benchmark): the ids
        # of the customers whose email is exactly this; of a customer's subscriptions; and of the
        # customers any of whose search snapshots holds this casefolded word in this string field.
        self._by_email: dict[str | None, list[str]] = {}
        self._subscriptions_of: dict[str, list[str]] = {}
        self._search_words: dict[tuple[str, str], set[str]] = {}
        self._remembered: dict[tuple[str, str], _Remembered] = {}  # by (API key, idempotency key)
        self._searches: deque[float] = deque()  # times of the searches in the last second
        self._default_configuration = str(self._new_configuration({}, is_default=True)["id"])

    # -- seeding, inspection, knobs ---------------------------------------------------------------

    def reset(self) -> None:
        """Forget requests, faults and all API state; restore the knobs to their defaults."""
        with self._lock:
            super().reset()
            self.search_delay_seconds, self.search_rate_limit, self.clock = self._defaults
            self._init_state()

    @property
    def default_configuration_id(self) -> str:
        """The ``bpc_...`` id of the account's default billing portal configuration."""
        return self._default_configuration

    def add_customer(
        self,
        email: str,
        *,
        name: str | None = None,
        created: int | None = None,
        subscription_statuses: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Create a customer (email stored exactly as given) with subscriptions; return its id.

        Search finds it ``search_delay_seconds`` from now, like a customer created through the API.
        """
        statuses = list(subscription_statuses)
        if not set(statuses) <= SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status in {statuses}")
        with self._lock:
            params = {"email": email, "name": name, "metadata": dict(metadata or {})}
            customer_id = str(self._new_customer(params, created)["id"])
            for status in statuses:
                self.add_subscription(customer_id, status, created=created)
            return customer_id

    def add_subscription(self, customer_id: str, status: str, *, created: int | None = None) -> str:
        """Give a customer a subscription in ``status``; return its ``sub_...`` id."""
        if status not in SUBSCRIPTION_STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        with self._lock:
            if customer_id not in self._customers:
                raise KeyError(customer_id)
            sub = _subscription(_new_id("sub"), customer_id, status, created or self._now())
            self._add(self._subscriptions, sub)
            self._subscriptions_of.setdefault(customer_id, []).append(sub["id"])
            return str(sub["id"])

    def update_customer(self, customer_id: str, **fields: str | None) -> None:
        """Change email, name, phone or description; search sees the change only after the delay."""
        if not set(fields) <= {"email", "name", "phone", "description"}:
            raise TypeError(f"cannot update {sorted(fields)}")
        with self._lock:
            customer = self._customers[customer_id]
            if "email" in fields:
                self._by_email[_email_key(customer["email"])].remove(customer_id)
                self._by_email.setdefault(_email_key(fields["email"]), []).append(customer_id)
            customer.update(fields)
            self._reindex(customer)

    def add_configuration(
        self, *, active: bool = True, default_return_url: str | None = None
    ) -> str:
        """Create a (non-default) billing portal configuration; return its ``bpc_...`` id."""
        with self._lock:
            params = {"default_return_url": default_return_url}
            config = self._new_configuration(params, is_default=False)
            config["active"] = active
            return str(config["id"])

    def set_configuration_active(self, config_id: str, active: bool) -> None:
        """Activate or deactivate a configuration, as the Dashboard (or an update call) does."""
        with self._lock:
            self._configurations[config_id].update(active=active, updated=self._now())

    def portal_sessions(self) -> list[PortalSession]:
        """Every billing portal session created so far, oldest first."""
        with self._lock:
            return list(self._sessions)

    def writes(self) -> list[RecordedRequest]:
        """Every POST and DELETE received so far (replays and refusals too), oldest first."""
        return [r for r in self.requests if r.method in ("POST", "DELETE")]

    # -- HTTP -------------------------------------------------------------------------------------

    def route(self, request: RecordedRequest) -> Response:
        request_id = _new_id("req")
        with self._lock:  # one request at a time: replays and rate limits need settled state
            if request.method == "GET" and request.path.startswith("/p/session/"):
                response = self._portal_page(request.path)
            else:
                try:
                    response = self._answer(request, request_id)
                except StripeAPIError as exc:
                    response = self._error_response(exc, request_id)
        version = request.headers.get("stripe-version", API_VERSION)
        response.headers.setdefault("Request-Id", request_id)
        response.headers.setdefault("Stripe-Version", version)
        return response

    def error(self, fault: Fault, request: RecordedRequest) -> Response:
        code = fault.reason or ("rate_limit" if fault.status == 429 else None)
        message = fault.message
        if message == Fault.message and code == "rate_limit":
            message = RATE_LIMIT_MESSAGE
        kind = "api_error" if fault.status >= 500 else "invalid_request_error"
        exc = StripeAPIError(fault.status, message, code, kind=kind, headers=fault.headers)
        response = self._error_response(exc, _new_id("req"))
        response.headers.setdefault("Stripe-Version", API_VERSION)
        return response

    def _answer(self, request: RecordedRequest, request_id: str) -> Response:
        api_key = self._authenticate(request)
        endpoint, args = self._match(request)
        granted = self._restricted.get(api_key)
        needed = {endpoint.permission, endpoint.permission.replace("_read", "_write")}
        if granted is not None and not granted & needed:
            raise StripeAPIError(
                403,
                f"The provided key '{mask_key(api_key)}' does not have the required permissions "
                f"for this endpoint on account '{ACCOUNT_ID}'. Having the '{endpoint.permission}' "
                "permission would allow this request to continue.",
            )
        params = decode_params(_pairs(request))
        key = request.headers.get("idempotency-key") if request.method == "POST" else None
        if key is not None and (api_key, key) in self._remembered:
            return self._replay(self._remembered[api_key, key], request, params, key, request_id)
        try:
            unknown = sorted(set(params) - endpoint.params)
            if unknown:
                message = f"Received unknown parameter: {unknown[0]}"
                raise StripeAPIError(400, message, "parameter_unknown", unknown[0])
            response = Response.json(200, endpoint.handler(_Call(params, args, key)))
        except StripeAPIError as exc:
            response = self._error_response(exc, request_id)
            # Stripe saves a result only once the endpoint has begun to execute; a refusal of the
            # parameters (or a rate limit) comes before that, so the key may be used again.
            if exc.code != "resource_missing":
                return response
        if key is not None:
            response.headers.update({"Idempotency-Key": key, "Original-Request": request_id})
            self._remembered[api_key, key] = _Remembered(request.path, params, response)
        return response

    def _authenticate(self, request: RecordedRequest) -> str:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise StripeAPIError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, "
                "or we can help at https://support.stripe.com/.",
                headers={"WWW-Authenticate": 'Basic realm="Stripe"'},
            )
        key = key.strip()
        if key not in self._api_keys and key not in self._restricted:
            raise StripeAPIError(401, f"Invalid API Key provided: {mask_key(key)}")
        return key

    def _match(self, request: RecordedRequest) -> tuple[_Endpoint, tuple[str, ...]]:
        for endpoint in self._endpoints:
            found = endpoint.path.fullmatch(request.path)
            if found and endpoint.method == request.method:
                return endpoint, found.groups()
        raise StripeAPIError(
            404,
            f"Unrecognized request URL ({request.method}: {request.path}). Please see "
            "https://stripe.com/docs or we can help at https://support.stripe.com/.",
        )

    def _replay(
        self,
        first: _Remembered,
        request: RecordedRequest,
        params: dict[str, Any],
        key: str,
        request_id: str,
    ) -> Response:
        advice = f"Try using a key other than '{key}' if you meant to execute a different request."
        if first.path != request.path:
            raise StripeAPIError(
                400,
                "Keys for idempotent requests can only be used for the same endpoint they were "
                f"first used for ('{first.path}' vs '{request.path}'). {advice}",
                kind="idempotency_error",
            )
        if first.params != params:
            raise StripeAPIError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. {advice}",
                kind="idempotency_error",
            )
        headers = {**first.response.headers, "Idempotent-Replayed": "true"}
        headers["Request-Id"] = request_id  # a new request; Original-Request names the first
        return Response(first.response.status, first.response.body, headers)

    def _error_response(self, exc: StripeAPIError, request_id: str) -> Response:
        body: dict[str, Any] = {"message": exc.message, "type": exc.kind}
        if exc.code:
            body["code"] = exc.code
            body["doc_url"] = "https://stripe.com/docs/error-codes/" + exc.code.replace("_", "-")
        if exc.param:
            body["param"] = exc.param
        if exc.status != 401:  # without a valid key there is no account log to point at
            log = f"https://dashboard.stripe.com/test/logs/{request_id}?t={self._now()}"
            body["request_log_url"] = log
        headers = {"Request-Id": request_id, **exc.headers}
        return Response.json(exc.status, {"error": dict(sorted(body.items()))}, headers)

    def _portal_page(self, path: str) -> Response:
        session = self._session_pages.get(path)
        if session is None:
            return Response(404, b"No such portal session.", {"Content-Type": "text/plain"})
        page = (
            "<!doctype html><title>Billing portal (sandbox)</title><h1>Billing portal</h1>"
            f"<p>Customer {html.escape(session['customer'])}</p>"
            f'<p><a href="{html.escape(session["return_url"] or "")}">Return</a></p>'
        )
        return Response(200, page.encode("utf-8"), {"Content-Type": "text/html; charset=utf-8"})

    # -- customers --------------------------------------------------------------------------------

    def _list_customers(self, call: _Call) -> dict[str, Any]:
        expand = read_expand(call.params, {"data.subscriptions"})
        email = call.params.get("email")
        if email is None:
            candidates: Iterable[dict[str, Any]] = self._customers.values()
        elif isinstance(email, str):  # exact and case-sensitive, as Stripe's filter
            candidates = (self._customers[i] for i in self._by_email.get(email, ()))
        else:  # email[x]=y: equal to no stored address
            candidates = ()
        matching = [
            c for c in self._newest_first(candidates) if created_ok(call.params, c["created"])
        ]
        page = self._page(matching, call.params, "/v1/customers", "customer")
        page["data"] = [self._render(c, bool(expand)) for c in page["data"]]
        return page

    def _search_customers(self, call: _Call) -> dict[str, Any]:
        now = self.clock()
        while self._searches and self._searches[0] <= now - 1.0:
            self._searches.popleft()
        if len(self._searches) >= self.search_rate_limit:
            raise StripeAPIError(429, RATE_LIMIT_MESSAGE, "rate_limit")
        self._searches.append(now)
        expand = read_expand(call.params, {"data.subscriptions", "total_count"})
        text = call.params.get("query")
        if not isinstance(text, str) or not text.strip():
            raise missing("query")
        query = parse(text, CUSTOMER_FIELDS, "customers")
        found = []
        for customer in self._newest_first(self._search_candidates(query)):
            indexed = [snapshot for at, snapshot in self._index[customer["id"]] if at <= now]
            if indexed and query.matches(indexed[-1]):
                found.append(customer)
        limit, start = read_limit(call.params), page_offset(call.params.get("page"))
        more = len(found) > start + limit
        page = found[start : start + limit]
        result: dict[str, Any] = {
            "object": "search_result",
            "data": [self._render(c, "data.subscriptions" in expand) for c in page],
            "has_more": more,
            "next_page": page_token(start + limit) if more else None,
            "url": "/v1/customers/search",
        }
        if "total_count" in expand:
            result["total_count"] = len(found)
        return result

    def _search_candidates(self, query: Query) -> Iterable[dict[str, Any]]:
        """Customers that may match ``query``: those whose snapshots hold the first word of a
        clause every match must pass (a positive ``field:"words"`` on a string field, joined by
        AND), else every customer. ``query.matches`` still decides."""
        if query.conjunction == "AND":
            for clause in query.clauses:
                string_field = CUSTOMER_FIELDS.get(clause.field) == "string"
                if clause.negated or clause.operator != ":" or not string_field:
                    continue
                words = str(clause.value).casefold().split() if clause.value is not None else []
                if words:
                    ids = self._search_words.get((clause.field, words[0]), set())
                    return [self._customers[i] for i in ids]
        return self._customers.values()

    def _create_customer(self, call: _Call) -> dict[str, Any]:
        expand = read_expand(call.params, {"subscriptions"})
        email = call.params.get("email")
        if email is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", str(email)):
            raise StripeAPIError(400, f"Invalid email address: {email}", "email_invalid", "email")
        return self._render(self._new_customer(call.params, None), bool(expand))

    def _retrieve_customer(self, call: _Call) -> dict[str, Any]:
        expand = read_expand(call.params, {"subscriptions"})
        customer = self._customers.get(call.args[0])
        if customer is None:
            raise no_such("customer", call.args[0], "id", status=404)
        return self._render(customer, bool(expand))

    def _new_customer(self, params: Mapping[str, Any], created: int | None) -> dict[str, Any]:
        # fmt: off
        customer: dict[str, Any] = {
            "id": _new_id("cus"), "object": "customer", "address": None, "balance": 0,
            "business_name": None, "created": created or self._now(), "currency": None,
            "customer_account": None, "default_source": None, "delinquent": False,
            "description": params.get("description"), "discount": None,
            "email": params.get("email"), "individual_name": None,
            "invoice_prefix": secrets.token_hex(4).upper(),
            "invoice_settings": {"custom_fields": None, "default_payment_method": None,
                                 "footer": None, "rendering_options": None},
            "livemode": False, "metadata": dict(params.get("metadata") or {}),
            "name": params.get("name"), "next_invoice_sequence": 1, "phone": params.get("phone"),
            "preferred_locales": list(params.get("preferred_locales") or []), "shipping": None,
            "tax_exempt": "none", "test_clock": None,
        }
        # fmt: on
        self._add(self._customers, customer)
        self._by_email.setdefault(_email_key(customer["email"]), []).append(customer["id"])
        self._index[customer["id"]] = []
        self._reindex(customer)
        return customer

    def _reindex(self, customer: dict[str, Any]) -> None:
        """Let search see ``customer`` as it is now, once the index has caught up."""
        visible_at = self.clock() + self.search_delay_seconds
        self._index[customer["id"]].append((visible_at, dict(customer)))
        for name, kind in CUSTOMER_FIELDS.items():
            if kind == "string" and customer.get(name) is not None:
                for word in str(customer[name]).casefold().split():
                    self._search_words.setdefault((name, word), set()).add(customer["id"])

    def _render(self, customer: dict[str, Any], with_subscriptions: bool) -> dict[str, Any]:
        out = dict(customer)
        if with_subscriptions:  # a customer's current subscriptions: all but canceled ones
            mine = self._subscriptions_of.get(customer["id"], ())
            subs = [
                s
                for s in self._newest_first(self._subscriptions[i] for i in mine)
                if s["status"] != "canceled"
            ]
            out["subscriptions"] = {
                "object": "list",
                "data": subs[:10],
                "has_more": len(subs) > 10,
                "total_count": len(subs),
                "url": f"/v1/customers/{customer['id']}/subscriptions",
            }
        return out

    # -- subscriptions ----------------------------------------------------------------------------

    def _list_subscriptions(self, call: _Call) -> dict[str, Any]:
        read_expand(call.params, set())
        customer = call.params.get("customer")
        if customer is not None and customer not in self._customers:
            raise no_such("customer", customer, "customer")
        status = call.params.get("status")
        if status is not None and status not in SUBSCRIPTION_STATUSES | {"all", "ended"}:
            raise invalid_choice("status", SUBSCRIPTION_STATUSES | {"all", "ended"})

        def wanted(status_now: str) -> bool:
            if status is None:  # Stripe's default: every subscription not canceled
                return status_now != "canceled"
            if status == "ended":
                return status_now in ("canceled", "incomplete_expired")
            return status in ("all", status_now)

        matching = [
            s
            for s in self._newest_first(self._subscriptions.values())
            if customer in (None, s["customer"])
            and wanted(s["status"])
            and created_ok(call.params, s["created"])
        ]
        return self._page(matching, call.params, "/v1/subscriptions", "subscription")

    # -- billing portal ---------------------------------------------------------------------------

    def _create_session(self, call: _Call) -> dict[str, Any]:
        p = call.params
        expand = read_expand(p, {"configuration"})
        customer, return_url, locale = p.get("customer"), p.get("return_url"), p.get("locale")
        if not customer:
            raise missing("customer")
        if return_url is not None and not is_url(return_url):
            raise StripeAPIError(400, "Not a valid URL", "url_invalid", "return_url")
        if locale is not None and locale not in PORTAL_LOCALES:
            raise invalid_choice("locale", PORTAL_LOCALES)
        if customer not in self._customers:
            raise no_such("customer", customer, "customer")
        config_id = p.get("configuration", self._default_configuration)
        config = self._configurations.get(config_id)
        if config is None:
            raise no_such("configuration", config_id, "configuration")
        path = f"/p/session/test_{secrets.token_urlsafe(30)}"
        # fmt: off
        session = {
            "id": _new_id("bps"), "object": "billing_portal.session",
            "after_expiration": p.get("after_expiration"),
            "configuration": config if expand else config_id, "created": self._now(),
            "customer": customer, "customer_account": None, "flow": p.get("flow_data"),
            "livemode": False, "locale": locale, "on_behalf_of": p.get("on_behalf_of"),
            "return_url": return_url or config["default_return_url"], "url": self.url + path,
        }
        # fmt: on
        self._session_pages[path] = session
        fields = {
            k: session[k] for k in ("id", "customer", "url", "return_url", "locale", "created")
        }
        self._sessions.append(
            PortalSession(**fields, configuration=config_id, idempotency_key=call.idempotency_key)
        )
        return session

    def _list_configurations(self, call: _Call) -> dict[str, Any]:
        read_expand(call.params, set())
        wanted = {
            k: read_bool(call.params, k) for k in ("active", "is_default") if k in call.params
        }
        matching = [
            c
            for c in self._newest_first(self._configurations.values())
            if all(c[k] == v for k, v in wanted.items())
        ]
        return self._page(
            matching, call.params, "/v1/billing_portal/configurations", "configuration"
        )

    def _retrieve_configuration(self, call: _Call) -> dict[str, Any]:
        read_expand(call.params, set())
        config = self._configurations.get(call.args[0])
        if config is None:
            # Stripe names a namespaced object by its type in a retrieve's 404, as it does for
            # "No such checkout.session: 'cs_...'".
            raise no_such("billing_portal.configuration", call.args[0], "id", status=404)
        return config

    def _create_configuration(self, call: _Call) -> dict[str, Any]:
        read_expand(call.params, set())
        if not isinstance(call.params.get("features"), dict):
            raise missing("features")
        return self._new_configuration(call.params, is_default=False)

    def _new_configuration(self, params: Mapping[str, Any], *, is_default: bool) -> dict[str, Any]:
        now = self._now()
        # fmt: off
        features: dict[str, Any] = {
            "customer_update": {"allowed_updates": ["email", "address"], "enabled": True},
            "invoice_history": {"enabled": True},
            "payment_method_update": {"enabled": True, "payment_method_configuration": None},
            "subscription_cancel": {"enabled": False, "mode": "at_period_end",
                                    "proration_behavior": "none",
                                    "cancellation_reason": {"enabled": False, "options": []}},
            "subscription_pause": {"enabled": False},
            "subscription_update": {"enabled": False, "default_allowed_updates": [],
                                    "products": [], "proration_behavior": "none"},
        }
        for feature, settings in form_booleans(params.get("features") or {}).items():
            features.setdefault(feature, {}).update(settings)
        profile = {"headline": None, "privacy_policy_url": None, "terms_of_service_url": None}
        config: dict[str, Any] = {
            "id": _new_id("bpc"), "object": "billing_portal.configuration", "active": True,
            "application": None, "business_profile": profile | params.get("business_profile", {}),
            "created": now, "default_return_url": params.get("default_return_url") or None,
            "features": features, "is_default": is_default, "livemode": False,
            "login_page": {"enabled": False, "url": None}, "metadata": params.get("metadata", {}),
            "name": params.get("name") or None, "updated": now,
        }
        # fmt: on
        self._add(self._configurations, config)
        return config

    # -- collections ------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    def _add(self, collection: dict[str, dict[str, Any]], obj: dict[str, Any]) -> None:
        collection[obj["id"]] = obj
        self._rank[obj["id"]] = (obj["created"], len(self._rank))

    def _newest_first(self, objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(objects, key=lambda o: self._rank[o["id"]], reverse=True)

    def _page(
        self, items: list[dict[str, Any]], params: Mapping[str, Any], url: str, kind: str
    ) -> dict[str, Any]:
        """One page of ``items`` (newest first) as a Stripe list object."""
        limit = read_limit(params)
        after, before = params.get("starting_after"), params.get("ending_before")
        if after is not None and before is not None:
            message = "You may only specify one of these parameters: ending_before, starting_after."
            raise StripeAPIError(400, message, param="ending_before")
        for cursor, param in ((after, "starting_after"), (before, "ending_before")):
            if cursor is not None and cursor not in self._rank:
                raise no_such(kind, cursor, param)
        if after is not None:
            items = [o for o in items if self._rank[o["id"]] < self._rank[after]]
        elif before is not None:  # the page just newer than the cursor: the oldest of the newer
            newer = [o for o in items if self._rank[o["id"]] > self._rank[before]]
            return {
                "object": "list",
                "data": newer[-limit:],
                "has_more": len(newer) > limit,
                "url": url,
            }
        return {"object": "list", "data": items[:limit], "has_more": len(items) > limit, "url": url}


def mask_key(key: str) -> str:
    """An API key as Stripe echoes it in errors: its prefix, asterisks, its last four characters."""
    if len(key) > 12:
        return key[:8] + "*" * (len(key) - 12) + key[-4:]
    return "*" * max(len(key) - 4, 0) + key[-4:]


def _email_key(email: object) -> str | None:
    """A customer's email as its ``_by_email`` key; None (never looked up) when it is no string."""
    return email if isinstance(email, str) else None


def _new_id(prefix: str) -> str:
    return prefix + "_" + "".join(secrets.choice(_ALNUM) for _ in range(14))


def _subscription(sub_id: str, customer: str, status: str, created: int) -> dict[str, Any]:
    ended = created if status in ("canceled", "incomplete_expired") else None
    # fmt: off
    return {
        "id": sub_id, "object": "subscription", "billing_cycle_anchor": created,
        "cancel_at": None, "cancel_at_period_end": False,
        "canceled_at": created if status == "canceled" else None,
        "collection_method": "charge_automatically", "created": created, "currency": "usd",
        "customer": customer, "ended_at": ended,
        "items": {"object": "list", "data": [], "has_more": False,
                  "url": f"/v1/subscription_items?subscription={sub_id}"},
        "livemode": False, "metadata": {}, "start_date": created, "status": status,
        "trial_end": None, "trial_start": None,
    }
    # fmt: on


def _pairs(request: RecordedRequest) -> list[tuple[str, str]]:
    if request.method == "POST":
        return urllib.parse.parse_qsl(request.body.decode("utf-8"), keep_blank_values=True)
    return [(name, value) for name, values in request.query.items() for value in values]
