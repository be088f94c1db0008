"""The retry mechanism itself: back-off, Retry-After, and stopping."""

from __future__ import annotations

import re
import threading
from dataclasses import replace

import pytest

from billing_responder import retry
from billing_responder.retry import RetryPolicy, parse_retry_after
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import Sandbox


class FlakyError(Exception):
    """A retryable failure carrying the server's Retry-After."""

    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("flaky")
        self.retry_after = retry_after


def policy(**overrides: float) -> RetryPolicy:
    return RetryPolicy(
        "Test",
        retryable=lambda exc: isinstance(exc, FlakyError),
        retry_after=lambda exc: exc.retry_after if isinstance(exc, FlakyError) else None,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture(autouse=True)
def _no_stop_left_behind() -> object:
    retry.clear_stop()
    yield
    retry.clear_stop()


class TestRetryPolicy:
    def test_retries_until_success_within_the_attempts(self) -> None:
        """A call failing twice then succeeding returns its value after three attempts."""
        calls: list[int] = []

        def call() -> str:
            calls.append(1)
            if len(calls) < 3:
                raise FlakyError()
            return "ok"

        assert policy().call(call, sleep=lambda s: None) == "ok"
        assert len(calls) == 3

    def test_gives_up_after_the_attempts_with_the_last_error(self) -> None:
        """After `attempts` failures the last error is raised, no more calls are made."""
        calls: list[int] = []

        def call() -> None:
            calls.append(1)
            raise FlakyError()

        with pytest.raises(FlakyError):
            policy(attempts=3).call(call, sleep=lambda s: None)
        assert len(calls) == 3

    def test_non_retryable_error_is_raised_at_once(self) -> None:
        """An error the adapter calls permanent is not retried."""
        calls: list[int] = []

        def call() -> None:
            calls.append(1)
            raise ValueError("permanent")

        with pytest.raises(ValueError):
            policy().call(call, sleep=lambda s: None)
        assert calls == [1]

    def test_retry_after_is_honoured_as_a_minimum_wait(self) -> None:
        """The wait before the next attempt is at least the server's Retry-After."""
        waits: list[float] = []
        outcomes = iter([FlakyError(retry_after=7.0), None])

        def call() -> str:
            error = next(outcomes)
            if error:
                raise error
            return "ok"

        policy(initial_wait=0.01, max_wait=0.02).call(call, sleep=waits.append)
        assert len(waits) == 1 and waits[0] >= 7.0

    def test_retry_after_beyond_the_cap_is_not_waited_out(self) -> None:
        """A Retry-After longer than max_retry_after ends the call at once (the message waits)."""
        calls: list[int] = []

        def call() -> None:
            calls.append(1)
            raise FlakyError(retry_after=3600)

        with pytest.raises(FlakyError):
            policy(max_retry_after=60).call(call, sleep=lambda s: None)
        assert calls == [1]

    def test_backoff_grows_exponentially_with_bounded_jitter(self) -> None:
        """Waits double per attempt from initial_wait, capped at max_wait, plus < initial_wait jitter."""
        p = policy(initial_wait=0.5, max_wait=4.0)
        for attempt, base in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 4.0)):
            wait = p.backoff(attempt)
            assert base <= wait < base + 0.5

    def test_stop_during_back_off_makes_no_further_attempt(self) -> None:
        """request_stop() while waiting ends the wait and the call, without another attempt."""
        calls: list[int] = []

        def call() -> None:
            calls.append(1)
            raise FlakyError(retry_after=30)

        timer = threading.Timer(0.2, retry.request_stop)
        timer.start()
        with pytest.raises(FlakyError):
            policy().call(call)
        timer.join()
        assert calls == [1]


class TestParseRetryAfter:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [("0", 0.0), ("12", 12.0), (" 3.5 ", 3.5), ("-4", 0.0), (None, None), ("soon", None)],
    )
    def test_delta_seconds(self, value: str | None, expected: float | None) -> None:
        """Delta-seconds parse to a non-negative float; garbage and absence give None."""
        assert parse_retry_after(value) == expected

    def test_http_date_in_the_past_means_now(self) -> None:
        """An HTTP-date Retry-After that has passed asks for no wait."""
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


class TestWhatIsRetried:
    """Which failures each adapter retries, seen on the wire (the emulators count the attempts)."""

    @staticmethod
    def _attempts(sandbox: Sandbox, path: str) -> list[int]:
        return [r.status for r in sandbox.gmail.requests + sandbox.stripe.requests
                if re.search(path, r.path)]

    @pytest.mark.parametrize(
        ("status", "reason", "retried"),
        [
            (403, "rateLimitExceeded", True),
            (403, "userRateLimitExceeded", True),
            (429, "rateLimitExceeded", True),
            (500, "backendError", True),
            (503, "backendError", True),
            (403, "forbidden", False),
            (400, "invalidArgument", False),
            (404, "notFound", False),
        ],
    )
    def test_gmail_retries_rate_limits_and_server_errors_only(
        self, sandbox: Sandbox, fast_retries: None, status: int, reason: str, retried: bool
    ) -> None:
        """Gmail 429, 5xx and 403 rate limits are retried; other 403s, 400 and 404 are not."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(status, method="GET", path=r"/messages/[0-9a-f]+$",
                                         reason=reason))
        sandbox.cli("once")
        attempts = self._attempts(sandbox, r"/messages/[0-9a-f]+$")
        assert attempts == ([status, 200] if retried else [status])
        assert len(sandbox.gmail.sent_messages()) == (1 if retried else 0)

    @pytest.mark.parametrize(
        ("fault", "retried"),
        [
            (Fault(429, reason="rate_limit"), True),
            (Fault(500), True),
            (Fault(503), True),
            (Fault(500, headers={"Stripe-Should-Retry": "false"}), False),
            (Fault(400, reason="parameter_invalid"), False),
            (Fault(409, reason="lock_timeout", headers={"Stripe-Should-Retry": "true"}), True),
        ],
        ids=["429", "500", "503", "500-should-retry-false", "400", "409-should-retry-true"],
    )
    def test_stripe_retries_what_stripe_says_is_worth_it(
        self, sandbox: Sandbox, fast_retries: None, fault: Fault, retried: bool
    ) -> None:
        """Stripe 429 and 5xx are retried unless Stripe-Should-Retry says otherwise (and vice versa)."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(
            replace(fault, method="POST", path="/v1/billing_portal/sessions"))
        sandbox.cli("once")
        attempts = self._attempts(sandbox, r"^/v1/billing_portal/sessions$")
        assert attempts == ([fault.status, 200] if retried else [fault.status])

    def test_stripe_authentication_error_is_fatal_and_not_retried(self, sandbox: Sandbox) -> None:
        """A 401 from Stripe ends the run with exit 1 after one attempt."""
        sandbox.stripe.inject_fault(Fault(401, method="GET", path="^/v1/customers$"))
        result = sandbox.cli("once")
        assert result.code == 1 and "API key was rejected" in result.stderr
        assert self._attempts(sandbox, r"^/v1/customers$") == [401]
