"""Transient and permanent faults on every endpoint a cycle calls, end to end through `once`.

Each case injects one kind of fault (429 with Retry-After, a burst of 503s, a Stripe 500, a
dropped connection, a timeout) into one endpoint, then runs `once` (at most three times, an hour
apart as the ledger sees it) and checks what the customer and the emulators saw: exactly one
reply, exactly one portal session, the replied label, no failed run. A fault that outlasts the
retries on a start-up call makes `once` exit 1, and the next run recovers. A permanent Stripe
error escalates the message after `[limits] max_attempts` with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pytest

from billing_responder.model import DONE
from billing_responder.sandbox._http import EmulatorServer, Fault
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import Sandbox
from tests.test_responder import NEEDS_HUMAN, REPLIED, _ledger, _time_passes

#: Per-request timeout set in the config for these tests; a timeout fault waits longer.
TIMEOUT = 0.5
MAX_RUNS = 3
#: Wall-clock bound for a whole case (every run together), retries and timeouts included.
BOUND_SECONDS = 15.0


@dataclass(frozen=True)
class Endpoint:
    service: str  # "gmail" or "stripe"
    method: str
    path: str  # regular expression searched in the request path


GMAIL_ENDPOINTS = {
    "gmail-messages.list": Endpoint("gmail", "GET", r"/users/me/messages$"),
    "gmail-messages.get": Endpoint("gmail", "GET", r"/messages/[0-9a-f]+$"),
    "gmail-messages.modify": Endpoint("gmail", "POST", r"/messages/[0-9a-f]+/modify$"),
    "gmail-users.getProfile": Endpoint("gmail", "GET", r"/users/me/profile$"),
    "gmail-labels.list": Endpoint("gmail", "GET", r"/users/me/labels$"),
}
STRIPE_ENDPOINTS = {
    "stripe-customers.list": Endpoint("stripe", "GET", r"^/v1/customers$"),
    "stripe-customers.search": Endpoint("stripe", "GET", r"^/v1/customers/search$"),
    "stripe-portal-session.create": Endpoint("stripe", "POST", r"^/v1/billing_portal/sessions$"),
}
SEND = Endpoint("gmail", "POST", r"/messages/send$")


def _fault(kind: str, endpoint: Endpoint, *, after: bool = False) -> Fault:
    """One kind of transient fault for ``endpoint``."""
    fault = Fault(503, method=endpoint.method, path=endpoint.path, after=after)
    if kind == "429":
        reason = "rateLimitExceeded" if endpoint.service == "gmail" else "rate_limit"
        return replace(fault, status=429, reason=reason, headers={"Retry-After": "0"}, times=2)
    if kind == "503-burst":
        return replace(fault, times=3)
    if kind == "500":
        return replace(fault, status=500, times=2)
    if kind == "drop":
        return replace(fault, drop=True, times=2)
    if kind == "timeout":
        return replace(fault, delay=TIMEOUT * 2, times=1)
    raise AssertionError(kind)


def _cases() -> list[object]:
    cases: list[object] = []
    for name, endpoint in GMAIL_ENDPOINTS.items():
        for kind in ("429", "503-burst", "drop", "timeout"):
            cases.append(pytest.param(endpoint, kind, id=f"{name}-{kind}"))
    for name, endpoint in STRIPE_ENDPOINTS.items():
        for kind in ("429", "503-burst", "500", "drop", "timeout"):
            cases.append(pytest.param(endpoint, kind, id=f"{name}-{kind}"))
    return cases


def _server(sandbox: Sandbox, endpoint: Endpoint) -> EmulatorServer:
    return sandbox.gmail if endpoint.service == "gmail" else sandbox.stripe


def _short_timeouts(sandbox: Sandbox) -> None:
    text = sandbox.config_path.read_text(encoding="utf-8")
    for section in ("[gmail]", "[stripe]"):
        assert section in text
        text = text.replace(section, f"{section}\ntimeout_seconds = {TIMEOUT}", 1)
    sandbox.config_path.write_text(text, encoding="utf-8")


def _until_answered(sandbox: Sandbox, message_id: str) -> list[int]:
    """Run `once` until the message carries the replied label (at most MAX_RUNS); exit codes."""
    codes: list[int] = []
    for _ in range(MAX_RUNS):
        codes.append(sandbox.cli("once").code)
        if REPLIED in sandbox.gmail.message_label_names(message_id):
            break
        _time_passes(sandbox, 3600)
    return codes


def _assert_exactly_one_reply(sandbox: Sandbox, message_id: str, thread_id: str) -> None:
    assert REPLIED in sandbox.gmail.message_label_names(message_id)
    sent = sandbox.gmail.sent_messages()
    assert len(sent) == 1, f"{len(sent)} replies reached the customer"
    assert sent[0].thread_id == thread_id
    sessions = sandbox.stripe.portal_sessions()
    assert len(sessions) == 1, f"{len(sessions)} portal sessions minted"
    body = sent[0].message.get_body(preferencelist=("plain",))
    assert body is not None and sessions[0].url in str(body.get_content())


@pytest.fixture
def billing_mail(sandbox: Sandbox, fast_retries: None) -> tuple[str, str]:
    """A known customer's billing email in the inbox, with short per-request timeouts."""
    _short_timeouts(sandbox)
    sandbox.stripe.add_customer("ada@example.com", subscription_statuses=["active"])
    return sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))


@pytest.mark.parametrize(("endpoint", "kind"), _cases())
def test_transient_fault_ends_in_exactly_one_reply(
    sandbox: Sandbox, billing_mail: tuple[str, str], endpoint: Endpoint, kind: str
) -> None:
    """A transient fault on any read or write ends in one reply, one session, the label, exit 0."""
    message_id, thread_id = billing_mail
    fault = _server(sandbox, endpoint).inject_fault(_fault(kind, endpoint))
    started = time.monotonic()

    codes = _until_answered(sandbox, message_id)

    assert time.monotonic() - started < BOUND_SECONDS
    assert fault.times == 0, "the fault never fired: the endpoint pattern is wrong"
    assert codes == [0] * len(codes), codes
    _assert_exactly_one_reply(sandbox, message_id, thread_id)
    # Once answered, it stays answered: another run sends and mints nothing more.
    assert sandbox.cli("once").code == 0
    _assert_exactly_one_reply(sandbox, message_id, thread_id)


@pytest.mark.parametrize(
    ("kind", "after"),
    [
        pytest.param("429", False, id="429-before-sending"),
        pytest.param("503-burst", False, id="503-before-sending"),
        pytest.param("503-burst", True, id="503-after-sending"),
        pytest.param("drop", False, id="drop-before-sending"),
        pytest.param("drop", True, id="drop-after-sending"),
        pytest.param("timeout", True, id="timeout-after-sending"),
    ],
)
def test_fault_on_send_ends_in_exactly_one_reply(
    sandbox: Sandbox, billing_mail: tuple[str, str], kind: str, after: bool
) -> None:
    """A failed messages.send, sent or not, is never repeated blindly: one reply in the end."""
    message_id, thread_id = billing_mail
    # A send is tried once per cycle, so each failure costs a cycle: one failure is the case.
    fault = sandbox.gmail.inject_fault(replace(_fault(kind, SEND, after=after), times=1))
    started = time.monotonic()

    codes = _until_answered(sandbox, message_id)

    assert time.monotonic() - started < BOUND_SECONDS
    assert codes == [0] * len(codes), codes
    assert fault.times == 0, "the fault never fired"
    _assert_exactly_one_reply(sandbox, message_id, thread_id)
    assert sandbox.cli("once").code == 0
    _assert_exactly_one_reply(sandbox, message_id, thread_id)


@pytest.mark.parametrize(
    "endpoint",
    [
        pytest.param(GMAIL_ENDPOINTS["gmail-users.getProfile"], id="gmail-users.getProfile"),
        pytest.param(GMAIL_ENDPOINTS["gmail-labels.list"], id="gmail-labels.list"),
        pytest.param(GMAIL_ENDPOINTS["gmail-messages.list"], id="gmail-messages.list"),
        pytest.param(STRIPE_ENDPOINTS["stripe-customers.list"], id="stripe-customers.list"),
    ],
)
def test_start_up_fault_outlasting_the_retries_exits_1_then_recovers(
    sandbox: Sandbox, billing_mail: tuple[str, str], endpoint: Endpoint
) -> None:
    """A start-up call failing past every retry makes `once` exit 1; the next run answers once."""
    message_id, thread_id = billing_mail
    _server(sandbox, endpoint).inject_fault(
        Fault(503, method=endpoint.method, path=endpoint.path, times=4)
    )

    first = sandbox.cli("once")

    assert first.code == 1, first.stderr
    assert sandbox.gmail.sent_messages() == []
    assert sandbox.cli("once").code == 0
    _assert_exactly_one_reply(sandbox, message_id, thread_id)


def test_permanent_stripe_error_escalates_with_the_reason_after_max_attempts(
    sandbox: Sandbox, billing_mail: tuple[str, str]
) -> None:
    """A Stripe 400 on every session create ends in needs-human naming the error, no reply."""
    message_id, thread_id = billing_mail
    sandbox.set_config("[limits]\nmax_attempts = 2")
    sandbox.stripe.inject_fault(
        Fault(400, method="POST", path=r"^/v1/billing_portal/sessions$", times=1000,
              reason="parameter_invalid", message="Invalid configuration: bpc_gone")
    )

    codes = []
    for _ in range(2):
        codes.append(sandbox.cli("once").code)
        _time_passes(sandbox, 3600)

    assert codes == [0, 0]
    creates = [r for r in sandbox.stripe.requests if r.path == "/v1/billing_portal/sessions"]
    assert len(creates) == 2, "a 400 is not retried within a cycle"
    assert NEEDS_HUMAN in sandbox.gmail.thread_label_names(thread_id)
    assert REPLIED not in sandbox.gmail.thread_label_names(thread_id)
    assert sandbox.gmail.sent_messages() == []
    entry = _ledger(sandbox).get(message_id)
    assert entry is not None and entry.state == DONE and entry.action == "escalate"
    assert any("400" in r and "bpc_gone" in r for r in entry.reasons), entry.reasons
