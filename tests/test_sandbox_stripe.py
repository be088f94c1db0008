"""The Stripe emulator, driven by the real stripe-python client over loopback HTTP.

Each test states a behaviour of the real Stripe API that billing-responder depends on (or must
survive) and checks that the emulator reproduces it as stripe-python sees it.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import stripe

from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.stripe import StripeEmulator, mask_key

API_KEY = "sk_test_sandbox"
OTHER_KEY = "sk_test_otherteam0000"
READ_ONLY_KEY = "rk_test_readonly00001234"
PORTAL_KEY = "rk_test_portalonly0005678"
RETURN_URL = "https://app.example.test/account"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def _stripe_server() -> Iterator[StripeEmulator]:
    restricted = {
        READ_ONLY_KEY: {"rak_customer_read"},
        PORTAL_KEY: {"rak_customer_read", "rak_billing_portal_write"},
    }
    with StripeEmulator(api_keys={API_KEY, OTHER_KEY}, restricted_keys=restricted) as server:
        yield server


@pytest.fixture
def emulator(_stripe_server: StripeEmulator) -> StripeEmulator:
    _stripe_server.reset()
    return _stripe_server


@pytest.fixture
def clock(emulator: StripeEmulator) -> FakeClock:
    fake = FakeClock()
    emulator.clock = fake
    return fake


def client_for(emulator: StripeEmulator, key: str = API_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": emulator.url}, max_network_retries=0)


@pytest.fixture
def client(emulator: StripeEmulator) -> stripe.StripeClient:
    return client_for(emulator)


def search_ids(client: stripe.StripeClient, query: str, **params: object) -> list[str]:
    everything: Any = {"query": query, **params}
    result = client.v1.customers.search(params=everything)
    return [c.id for c in result.data]


def create_session(
    client: stripe.StripeClient, customer: str, key: str | None = None, **params: str
) -> stripe.billing_portal.Session:
    everything: Any = {"customer": customer, "return_url": RETURN_URL, **params}
    options: Any = {"idempotency_key": key} if key else {}
    return client.v1.billing_portal.sessions.create(params=everything, options=options)


def response_headers(obj: stripe.StripeObject) -> Mapping[str, str]:
    assert obj.last_response is not None
    return obj.last_response.headers


def error_body(exc: stripe.StripeError) -> dict[str, Any]:
    assert isinstance(exc.json_body, dict)
    return dict(exc.json_body["error"])


class TestCustomerList:
    def test_email_filter_is_exact_and_case_sensitive(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """Listing by email finds only the exact spelling, as Stripe stores it."""
        ada = emulator.add_customer("Ada@Example.com")
        emulator.add_customer("ada@example.com.evil.test")

        def listed(email: str) -> list[str]:
            return [c.id for c in client.v1.customers.list(params={"email": email}).data]

        assert listed("Ada@Example.com") == [ada]
        assert listed("ada@example.com") == []
        assert listed("Ada@Example") == []

    def test_email_filter_follows_an_updated_email(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """After an email change the list filter finds the customer by the new address only,
        newest first among those sharing it."""
        older = emulator.add_customer("old@example.com", created=1000)
        newer = emulator.add_customer("new@example.com", created=2000)
        emulator.update_customer(older, email="new@example.com")

        def listed(email: str) -> list[str]:
            return [c.id for c in client.v1.customers.list(params={"email": email}).data]

        assert listed("old@example.com") == []
        assert listed("new@example.com") == [newer, older]

    def test_newest_first_with_cursor_paging(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """Pages run newest first; starting_after and ending_before walk them with has_more."""
        ids = [emulator.add_customer(f"c{n}@example.com", created=1000 + n) for n in range(5)]
        newest_first = ids[::-1]

        first = client.v1.customers.list(params={"limit": 2})
        second = client.v1.customers.list(params={"limit": 2, "starting_after": first.data[-1].id})
        last = client.v1.customers.list(params={"limit": 2, "starting_after": second.data[-1].id})
        back = client.v1.customers.list(params={"limit": 2, "ending_before": last.data[0].id})

        assert [c.id for c in first.data] == newest_first[:2] and first.has_more
        assert [c.id for c in second.data] == newest_first[2:4] and second.has_more
        assert [c.id for c in last.data] == newest_first[4:] and not last.has_more
        assert [c.id for c in back.data] == newest_first[2:4] and back.has_more

    def test_auto_paging_visits_every_customer_once(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """stripe-python's auto-pagination, which follows the list's url, sees each customer once."""
        ids = {emulator.add_customer(f"p{n}@example.com") for n in range(7)}

        seen = [c.id for c in client.v1.customers.list(params={"limit": 3}).auto_paging_iter()]

        assert sorted(seen) == sorted(ids)

    def test_subscriptions_only_when_expanded(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """Customers carry no subscriptions unless expanded; expanded, canceled ones are left out."""
        emulator.add_customer("sub@example.com", subscription_statuses=["past_due", "canceled"])

        plain = client.v1.customers.list(params={"email": "sub@example.com"}).data[0]
        expanded = client.v1.customers.list(
            params={"email": "sub@example.com", "expand": ["data.subscriptions"]}
        ).data[0]

        assert "subscriptions" not in plain.to_dict()
        assert [s["status"] for s in expanded.to_dict()["subscriptions"]["data"]] == ["past_due"]

    def test_created_filter(self, emulator: StripeEmulator, client: stripe.StripeClient) -> None:
        """The created filter keeps customers inside its bounds."""
        emulator.add_customer("old@example.com", created=100)
        recent = emulator.add_customer("new@example.com", created=200)

        found = client.v1.customers.list(params={"created": {"gte": 150}}).data

        assert [c.id for c in found] == [recent]

    @pytest.mark.parametrize("limit", [0, 101])
    def test_limit_outside_1_to_100_is_refused(
        self, client: stripe.StripeClient, limit: int
    ) -> None:
        """A limit outside 1..100 is an invalid request naming the limit parameter."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.customers.list(params={"limit": limit})
        assert caught.value.param == "limit"

    def test_unknown_parameter_is_refused(self, client: stripe.StripeClient) -> None:
        """A parameter the endpoint does not know is refused as parameter_unknown."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            misspelt: Any = {"emial": "x@example.com"}
            client.v1.customers.list(params=misspelt)
        assert (caught.value.code, caught.value.param) == ("parameter_unknown", "emial")


class TestCustomerObjects:
    def test_create_stores_email_as_given(self, client: stripe.StripeClient) -> None:
        """A created customer keeps its email's capitalisation and is then listed under it."""
        made = client.v1.customers.create(params={"email": "Mixed@Case.test", "name": "M"})

        listed = client.v1.customers.list(params={"email": "Mixed@Case.test"}).data

        assert made.email == "Mixed@Case.test" and made.id.startswith("cus_")
        assert [c.id for c in listed] == [made.id]

    def test_retrieve_unknown_customer_is_404(self, client: stripe.StripeClient) -> None:
        """Retrieving a customer that does not exist is a 404 resource_missing."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.customers.retrieve("cus_doesnotexist00")
        assert caught.value.http_status == 404
        assert caught.value.code == "resource_missing"
        assert "No such customer: 'cus_doesnotexist00'" in str(caught.value)

    def test_retrieve_expands_subscriptions(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """Retrieve embeds the customer's subscriptions only with expand[]=subscriptions."""
        customer = emulator.add_customer("r@example.com", subscription_statuses=["active"])

        plain = client.v1.customers.retrieve(customer)
        expanded = client.v1.customers.retrieve(customer, params={"expand": ["subscriptions"]})

        assert "subscriptions" not in plain.to_dict()
        assert expanded.to_dict()["subscriptions"]["data"][0]["status"] == "active"


class TestSearch:
    def test_email_matches_any_case_once_indexed(
        self, emulator: StripeEmulator, client: stripe.StripeClient, clock: FakeClock
    ) -> None:
        """Search ignores case, but a new customer is found only after the search delay."""
        emulator.search_delay_seconds = 60
        customer = emulator.add_customer("Grace@Example.net")

        clock.advance(59)
        before = search_ids(client, 'email:"grace@example.net"')
        clock.advance(2)
        after = search_ids(client, 'email:"grace@example.net"')

        assert before == []
        assert after == [customer]

    def test_update_is_seen_only_after_the_delay(
        self, emulator: StripeEmulator, client: stripe.StripeClient, clock: FakeClock
    ) -> None:
        """After an update search still answers from the old record until the index catches up."""
        customer = emulator.add_customer("old@example.com")
        emulator.search_delay_seconds = 30
        emulator.update_customer(customer, email="new@example.com")

        stale = search_ids(client, 'email:"old@example.com"')
        clock.advance(31)
        fresh = search_ids(client, 'email:"new@example.com"')

        assert stale == [customer] and fresh == [customer]
        assert search_ids(client, 'email:"old@example.com"') == []

    def test_substring_name_and_or(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """~ matches substrings of 3+ characters; OR widens and AND narrows the result."""
        ada = emulator.add_customer("ada@lovelace.test", name="Ada Lovelace")
        grace = emulator.add_customer("grace@hopper.test", name="Grace Hopper")

        assert search_ids(client, 'email~"LOVE"') == [ada]
        assert set(search_ids(client, 'name:"ada lovelace" OR email~"hopper"')) == {ada, grace}
        assert search_ids(client, 'name:"lovelace" AND email~"hopper"') == []
        assert search_ids(client, '-email~"hopper"') == [ada]

    def test_words_match_in_order_whatever_the_case(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """``:`` on a string field wants the query's words together and in order, in any case;
        a negated clause keeps everyone else."""
        ada = emulator.add_customer("a@example.com", name="Ada King Lovelace")
        king = emulator.add_customer("k@example.com", name="king ada")
        emulator.add_customer("n@example.com")  # no name at all

        assert search_ids(client, 'name:"ada king"') == [ada]
        assert search_ids(client, 'name:"KING"') == [king, ada]
        assert search_ids(client, 'name:"lovelace ada"') == []
        assert search_ids(client, '-name:"lovelace" name:"king"') == [king]

    @pytest.mark.parametrize(
        ("query", "says"),
        [
            ('email~"ad"', "at least 3 characters"),
            ('plan:"gold"', "Field `plan` is an unsupported search field"),
            ("email:ada", "unable to parse"),
            ('email:"a" AND name:"b" OR name:"c"', "cannot be combined"),
            ('email>"a"', "not supported"),
        ],
    )
    def test_bad_queries_are_refused(
        self, client: stripe.StripeClient, query: str, says: str
    ) -> None:
        """A query outside the language is an invalid request naming the query parameter."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.customers.search(params={"query": query})
        assert caught.value.param == "query"
        assert says in str(caught.value)

    def test_pages_follow_next_page(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """A search page with more results names the next page; the pages cover every match once."""
        ids = {emulator.add_customer(f"team{n}@acme.test") for n in range(3)}

        first = client.v1.customers.search(params={"query": 'email~"acme"', "limit": 2})
        second = client.v1.customers.search(
            params={"query": 'email~"acme"', "limit": 2, "page": first.next_page}
        )

        assert first.has_more and not second.has_more and second.next_page is None
        assert {c.id for c in [*first.data, *second.data]} == ids
        assert first.object == "search_result" and first.url == "/v1/customers/search"

    def test_rate_limit_is_twenty_per_second(
        self, emulator: StripeEmulator, client: stripe.StripeClient, clock: FakeClock
    ) -> None:
        """The 21st search within a second is refused with 429 rate_limit; a second later it works."""
        for _ in range(20):
            search_ids(client, 'email:"x@example.com"')

        with pytest.raises(stripe.RateLimitError) as caught:
            search_ids(client, 'email:"x@example.com"')
        clock.advance(1.0)

        assert caught.value.http_status == 429
        assert error_body(caught.value)["code"] == "rate_limit"
        assert search_ids(client, 'email:"x@example.com"') == []


class TestSubscriptions:
    def test_default_list_leaves_out_canceled(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """Without status the list omits canceled subscriptions; status=all includes them."""
        customer = emulator.add_customer(
            "s@example.com", subscription_statuses=["active", "canceled"]
        )

        default = client.v1.subscriptions.list(params={"customer": customer})
        everything = client.v1.subscriptions.list(params={"customer": customer, "status": "all"})

        assert [s.status for s in default.data] == ["active"]
        assert sorted(s.status for s in everything.data) == ["active", "canceled"]

    def test_unknown_customer_is_refused(self, client: stripe.StripeClient) -> None:
        """Listing the subscriptions of a customer that does not exist names the customer param."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.subscriptions.list(params={"customer": "cus_nobody000000"})
        assert caught.value.param == "customer"


class TestPortalSessions:
    def test_session_has_url_on_the_emulator_and_is_recorded(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """A session links to this emulator, uses the default configuration and is recorded."""
        customer = emulator.add_customer("p@example.com")

        session = create_session(client, customer, key="reply-1", locale="fr")

        assert session.object == "billing_portal.session" and session.id.startswith("bps_")
        assert session.url.startswith(f"{emulator.url}/p/session/test_")
        assert session.configuration == emulator.default_configuration_id
        assert (session.flow, session.on_behalf_of, session.livemode) == (None, None, False)
        [recorded] = emulator.portal_sessions()
        assert (recorded.customer, recorded.url, recorded.locale) == (customer, session.url, "fr")
        assert (recorded.return_url, recorded.idempotency_key) == (RETURN_URL, "reply-1")
        with urllib.request.urlopen(session.url) as page:
            assert customer in page.read().decode()

    def test_unknown_customer_names_the_customer_param(self, client: stripe.StripeClient) -> None:
        """A session for a customer that does not exist is resource_missing on param customer."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            create_session(client, "cus_nobody000000")
        assert (caught.value.code, caught.value.param) == ("resource_missing", "customer")

    def test_missing_customer_is_parameter_missing(self, client: stripe.StripeClient) -> None:
        """A session without a customer is refused as parameter_missing."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.billing_portal.sessions.create(params={"return_url": RETURN_URL})
        assert (caught.value.code, caught.value.param) == ("parameter_missing", "customer")

    @pytest.mark.parametrize(
        ("params", "param"),
        [({"locale": "xx-YY"}, "locale"), ({"return_url": "not a url"}, "return_url")],
    )
    def test_bad_values_are_refused(
        self,
        emulator: StripeEmulator,
        client: stripe.StripeClient,
        params: dict[str, str],
        param: str,
    ) -> None:
        """An unknown locale or a return_url that is not a URL is refused, naming the parameter."""
        customer = emulator.add_customer("v@example.com")
        with pytest.raises(stripe.InvalidRequestError) as caught:
            create_session(client, customer, **params)
        assert caught.value.param == param

    def test_unknown_configuration_is_refused(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """A configuration that does not exist is resource_missing on param configuration."""
        customer = emulator.add_customer("c@example.com")
        with pytest.raises(stripe.InvalidRequestError) as caught:
            create_session(client, customer, configuration="bpc_nope000000000")
        assert caught.value.param == "configuration"


class TestIdempotency:
    def test_same_key_same_params_replays_without_a_second_session(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """A retried create with the same key returns the same session and creates no other."""
        customer = emulator.add_customer("i@example.com")

        first = create_session(client, customer, key="msg-42")
        again = create_session(client, customer, key="msg-42")

        assert again.id == first.id and again.url == first.url
        assert response_headers(again)["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in response_headers(first)
        assert len(emulator.portal_sessions()) == 1

    def test_same_key_different_params_is_an_idempotency_error(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """Reusing a key with other parameters is refused with Stripe's idempotency_error."""
        customer = emulator.add_customer("i@example.com")
        create_session(client, customer, key="msg-43")

        with pytest.raises(stripe.IdempotencyError) as caught:
            create_session(client, customer, key="msg-43", locale="de")

        assert "can only be used with the same parameters they were first used with" in str(
            caught.value
        )
        assert "Try using a key other than 'msg-43'" in str(caught.value)
        assert len(emulator.portal_sessions()) == 1

    def test_same_key_on_another_endpoint_is_an_idempotency_error(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """A key first used to create a customer cannot create a portal session."""
        client.v1.customers.create(
            params={"email": "k@example.com"}, options={"idempotency_key": "k"}
        )
        customer = emulator.add_customer("k2@example.com")

        with pytest.raises(stripe.IdempotencyError, match="same endpoint"):
            create_session(client, customer, key="k")

    def test_failed_validation_is_not_remembered(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """A request refused for its parameters may be retried, corrected, with the same key."""
        customer = emulator.add_customer("f@example.com")
        with pytest.raises(stripe.InvalidRequestError):
            create_session(client, customer, key="fix-me", locale="klingon")

        session = create_session(client, customer, key="fix-me")

        assert session.customer == customer

    def test_missing_customer_refusal_is_replayed(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """A resource_missing answer is kept: the same request with its key gets it again."""
        for _ in range(2):
            with pytest.raises(stripe.InvalidRequestError) as caught:
                create_session(client, "cus_nobody000000", key="gone")
        assert (caught.value.headers or {})["Idempotent-Replayed"] == "true"
        assert emulator.portal_sessions() == []

    def test_keys_are_scoped_per_api_key(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """The same idempotency key under two API keys makes two sessions."""
        customer = emulator.add_customer("two@example.com")

        mine = create_session(client, customer, key="shared")
        theirs = create_session(client_for(emulator, OTHER_KEY), customer, key="shared")

        assert mine.id != theirs.id and len(emulator.portal_sessions()) == 2

    def test_concurrent_retries_make_one_session(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """Eight simultaneous creates with one key yield one session, seen by all eight."""
        customer = emulator.add_customer("race@example.com")
        ids: list[str] = []

        def create() -> None:
            ids.append(create_session(client_for(emulator), customer, key="race").id)

        threads = [threading.Thread(target=create) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len(ids) == 8 and len(set(ids)) == 1
        assert len(emulator.portal_sessions()) == 1


class TestConfigurations:
    def test_one_default_configuration_exists(self, client: stripe.StripeClient) -> None:
        """A fresh account has exactly one configuration, active and the default."""
        [config] = client.v1.billing_portal.configurations.list().data
        assert (config.active, config.is_default, config.object) == (
            True,
            True,
            "billing_portal.configuration",
        )

    def test_created_configuration_is_listed_and_usable(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """A created configuration keeps its features, is not default, and can open sessions."""
        made = client.v1.billing_portal.configurations.create(
            params={"features": {"invoice_history": {"enabled": False}}}
        )
        customer = emulator.add_customer("cfg@example.com")

        listed = client.v1.billing_portal.configurations.list(params={"is_default": False}).data
        session = create_session(client, customer, configuration=made.id)

        assert made.features.invoice_history.enabled is False and made.is_default is False
        assert [c.id for c in listed] == [made.id]
        assert session.configuration == made.id

    def test_features_are_required(self, client: stripe.StripeClient) -> None:
        """Creating a configuration without features is parameter_missing."""
        with pytest.raises(stripe.InvalidRequestError) as caught:
            no_features: Any = {"name": "x"}
            client.v1.billing_portal.configurations.create(params=no_features)
        assert caught.value.param == "features"


class TestAuthentication:
    def test_unknown_key_is_an_authentication_error_with_the_key_masked(
        self, emulator: StripeEmulator
    ) -> None:
        """An unknown key is a 401 that shows only the key's prefix and last four characters."""
        with pytest.raises(stripe.AuthenticationError) as caught:
            client_for(emulator, "sk_test_wrongkey9876abcd").v1.customers.list()
        assert caught.value.http_status == 401
        assert str(caught.value).endswith("Invalid API Key provided: sk_test_************abcd")
        assert "wrongkey" not in str(caught.value)

    def test_restricted_key_may_read_but_not_write(self, emulator: StripeEmulator) -> None:
        """A read-only restricted key lists customers but may not open portal sessions."""
        customer = emulator.add_customer("rk@example.com")
        restricted = client_for(emulator, READ_ONLY_KEY)

        assert [c.id for c in restricted.v1.customers.list().data] == [customer]
        with pytest.raises(stripe.PermissionError, match="rak_billing_portal_write"):
            create_session(restricted, customer)
        assert len(create_session(client_for(emulator, PORTAL_KEY), customer).id) > 4

    def test_missing_key_is_a_401(self, emulator: StripeEmulator) -> None:
        """A request without credentials is told to provide an API key."""
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{emulator.url}/v1/customers")
        assert caught.value.code == 401
        assert b"You did not provide an API key" in caught.value.read()

    @pytest.mark.parametrize(
        ("key", "masked"),
        [("sk_test_1234abcd", "sk_test_****abcd"), ("undefined", "*****ined")],
    )
    def test_masking_matches_stripe(self, key: str, masked: str) -> None:
        """Keys are masked as in Stripe's messages: first eight and last four characters shown."""
        assert mask_key(key) == masked


class TestErrorsAndFaults:
    @pytest.mark.parametrize(
        ("fault", "error"),
        [
            (Fault(503), stripe.APIError),
            (Fault(500), stripe.APIError),
            (
                Fault(429, reason="rate_limit", headers={"Stripe-Should-Retry": "true"}),
                stripe.RateLimitError,
            ),
            (Fault(401), stripe.AuthenticationError),
            (Fault(403), stripe.PermissionError),
        ],
    )
    def test_injected_faults_raise_the_matching_exception(
        self,
        emulator: StripeEmulator,
        client: stripe.StripeClient,
        fault: Fault,
        error: type[stripe.StripeError],
    ) -> None:
        """An injected fault comes back in Stripe's shape, so stripe-python raises its own class."""
        emulator.inject_fault(fault)
        with pytest.raises(error) as caught:
            client.v1.customers.list()
        assert caught.value.http_status == fault.status
        assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")
        assert set(error_body(caught.value)) >= {"type", "message"}
        for name, value in fault.headers.items():
            assert (caught.value.headers or {})[name] == value

    def test_every_answer_has_a_request_id(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """Successes and errors alike carry a req_ Request-Id, different for each request."""
        first = client.v1.customers.list()
        second = client.v1.customers.list()
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.customers.retrieve("cus_missing0000000")

        ids = [
            response_headers(first)["Request-Id"],
            response_headers(second)["Request-Id"],
            caught.value.request_id,
        ]
        assert all(i and i.startswith("req_") for i in ids) and len(set(ids)) == 3

    def test_unknown_url_is_a_404(self, client: stripe.StripeClient) -> None:
        """A path Stripe does not serve is a 404 invalid request, not an emulator crash."""
        with pytest.raises(stripe.InvalidRequestError, match="Unrecognized request URL") as caught:
            client.raw_request("get", "/v1/charges_that_do_not_exist")
        assert caught.value.http_status == 404


class TestInspection:
    def test_writes_lists_posts_only(
        self, emulator: StripeEmulator, client: stripe.StripeClient
    ) -> None:
        """writes() holds the POSTs sent, with the form body and idempotency key, and no GETs."""
        customer = emulator.add_customer("w@example.com")
        client.v1.customers.list()
        create_session(client, customer, key="w-1")

        [write] = emulator.writes()

        assert write.path == "/v1/billing_portal/sessions"
        assert write.headers["idempotency-key"] == "w-1"
        assert write.form()["customer"] == [customer]

    def test_seeding_rejects_unknown_statuses(self, emulator: StripeEmulator) -> None:
        """Seeding a subscription status Stripe does not have fails loudly."""
        with pytest.raises(ValueError, match="status"):
            emulator.add_customer("x@example.com", subscription_statuses=["gold"])

    def test_reset_forgets_state_and_restores_knobs(self, emulator: StripeEmulator) -> None:
        """reset() drops customers, sessions and remembered keys and restores the search delay."""
        emulator.add_customer("gone@example.com")
        emulator.search_delay_seconds = 99

        emulator.reset()

        assert emulator.search_delay_seconds == 0
        assert client_for(emulator).v1.customers.list().data == []
