"""`run` starting while Gmail or Stripe is down: it waits the outage out instead of exiting.

Under systemd an exit at start-up is a restart 30 s later, and five of those within 30 minutes
leave the unit failed for good; so an outage at start-up must be retried in-process. What no
waiting can fix (a refused key, lost authorisation) must still end the start at once.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import Sandbox
from tests.test_alerts import refuse_stripe_key
from tests.test_cli import start_daemon, stop, wait_for

GMAIL_PROFILE = r"/users/me/profile$"
STRIPE_VERIFY = r"^/v1/customers$"  # billing.verify(): GET /v1/customers?limit=1
# A Retry-After beyond what the adapters wait out inside a call: each start-up attempt fails at
# its first request, so the tests see several start-up attempts without the adapters' back-off.
AT_ONCE = {"Retry-After": "3600"}


def exit_of(process: subprocess.Popen[str], seconds: float = 15) -> tuple[int, float, str]:
    """Wait for the process to end on its own: exit code, seconds taken, stderr."""
    started = time.monotonic()
    try:
        _, err = process.communicate(timeout=seconds)
    finally:
        if process.poll() is None:
            stop(process)
    return process.returncode, time.monotonic() - started, err


class TestOutageAtStartUp:
    @pytest.mark.parametrize(
        ("service", "fault"),
        [
            ("Gmail", Fault(503, method="GET", path=GMAIL_PROFILE, times=4)),
            ("Stripe", Fault(503, method="GET", path=STRIPE_VERIFY, times=4)),
        ],
        ids=["gmail", "stripe"],
    )
    def test_run_waits_out_an_outage_at_start_up_and_then_answers(
        self, sandbox: Sandbox, service: str, fault: Fault
    ) -> None:
        """A start-up check failing after the adapter's retries logs one ERROR line, is tried again, and mail is answered once the service is back."""
        sandbox.set_config("[schedule]\ninterval_seconds = 1")
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        emulator = sandbox.gmail if service == "Gmail" else sandbox.stripe
        emulator.inject_fault(fault)  # the 4 attempts of one start-up check
        process = start_daemon(sandbox)
        try:
            assert wait_for(lambda: sandbox.gmail.sent_messages() or process.poll() is not None,
                            seconds=40)
        finally:
            code, _, _, err = stop(process)
        assert code == 0, err
        failures = [line for line in err.splitlines() if "start-up attempt" in line]
        assert len(failures) == 1, err
        assert "ERROR" in failures[0]
        assert f"start-up attempt 1 failed, retrying in 1 s: {service}: " in failures[0]
        assert "503" in failures[0]
        assert "started after 1 failed attempt(s)" in err
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_sigterm_while_start_up_waits_to_retry_exits_0_at_once(self, sandbox: Sandbox) -> None:
        """SIGTERM during the start-up back-off (here 4 s) ends it: exit 0 within 2 s, no further attempt."""
        sandbox.gmail.inject_fault(
            Fault(503, method="GET", path=GMAIL_PROFILE, times=1000, headers=AT_ONCE)
        )

        def attempts() -> int:
            return sum(r.path.endswith("/profile") for r in sandbox.gmail.requests)

        process = start_daemon(sandbox)
        try:
            # The third failed attempt is followed by a 4-second wait.
            assert wait_for(lambda: attempts() >= 3 or process.poll() is not None)
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.5)
            before = attempts()
        finally:
            code, seconds, _, err = stop(process)
        assert code == 0, err
        assert seconds < 2, err
        assert attempts() == before == 3
        assert "start-up attempt 3 failed, retrying in 4 s" in err

    def test_start_up_retries_double_their_wait(self, sandbox: Sandbox) -> None:
        """Three failed start-up attempts are followed by waits of 1, 2 and 4 s, then the daemon runs."""
        sandbox.set_config("[schedule]\ninterval_seconds = 1")
        sandbox.stripe.inject_fault(
            Fault(503, method="GET", path=STRIPE_VERIFY, times=3, headers=AT_ONCE)
        )
        process = start_daemon(sandbox)
        try:
            assert wait_for(lambda: process.poll() is not None or any(
                "/history" in r.path or "/messages" in r.path for r in sandbox.gmail.requests
            ), seconds=40)
        finally:
            code, _, _, err = stop(process)
        assert code == 0, err
        verifies = [r for r in sandbox.stripe.requests if r.path == "/v1/customers"]
        assert len(verifies) == 4, verifies
        waits = [line.split("retrying in ")[1].split(":")[0]
                 for line in err.splitlines() if "start-up attempt" in line]
        assert waits == ["1 s", "2 s", "4 s"], err


class TestWhatWaitingCannotFix:
    def test_a_refused_stripe_key_at_start_up_still_exits_1_at_once(self, sandbox: Sandbox) -> None:
        """A key Stripe refuses (401) is no outage: `run` exits 1 without a start-up retry."""
        refuse_stripe_key(sandbox)
        code, seconds, err = exit_of(start_daemon(sandbox))
        assert code == 1, err
        assert "start-up attempt" not in err
        assert seconds < 15
        assert len([r for r in sandbox.stripe.requests if r.path == "/v1/customers"]) == 1

    def test_lost_gmail_authorisation_at_start_up_still_exits_3_at_once(
        self, sandbox: Sandbox
    ) -> None:
        """A revoked refresh token is no outage: `run` exits 3 without a start-up retry."""
        sandbox.gmail.revoke()
        code, seconds, err = exit_of(start_daemon(sandbox))
        assert code == 3, err
        assert "start-up attempt" not in err
        assert seconds < 15
