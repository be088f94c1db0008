"""[notify]: the operator hears that the responder stopped, by command hook and by email.

The hook is a real program (this Python, writing what it was given to a file); the email is
whatever the Gmail emulator received. Lost authorisation comes from the emulator revoking the
refresh token, under `once` in-process and under `run` as a daemon subprocess.
"""

from __future__ import annotations

import json
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from billing_responder import alerts
from billing_responder.sandbox.inbox import MAILBOX, person_mail
from billing_responder.sandbox.stripe import DEFAULT_API_KEY
from tests.conftest import Sandbox
from tests.test_auth import use_service_account
from tests.test_cli import start_daemon, stop, wait_for

NOTIFY = "ops@acme-saas.test"
# Writes the notification's environment, as the hook saw it, to the file named by argv[1].
HOOK = (
    "import json, os, sys\n"
    "names = ('BILLING_RESPONDER_PROBLEM', 'BILLING_RESPONDER_EXIT_CODE', 'STRIPE_API_KEY',\n"
    "         'CREDENTIALS_DIRECTORY', 'NOTIFY_SOCKET', 'WATCHDOG_USEC')\n"
    "json.dump({n: os.environ.get(n) for n in names}, open(sys.argv[1], 'w'))\n"
)


def hook_command(*program: str) -> str:
    """A TOML array (JSON's string syntax is TOML's) running ``python -c PROGRAM ARGS``."""
    return json.dumps([sys.executable, "-c", *program])


def with_hook(sandbox: Sandbox, *, email: str = "") -> Path:
    """[notify] command = the recording hook (and email, if given); returns its output file."""
    seen = sandbox.folder / "hook.json"
    email_line = f'email = "{email}"\n' if email else ""
    sandbox.set_config(f"[notify]\ncommand = {hook_command(HOOK, str(seen))}\n{email_line}")
    return seen


def refuse_stripe_key(sandbox: Sandbox) -> None:
    (sandbox.folder / "stripe.key").write_text("sk_test_wrong0000000000")


class TestCommandHook:
    def test_a_revoked_token_under_once_runs_the_hook_with_the_problem(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """invalid_grant: exit 3, and the hook ran with the problem and exit code, without the Stripe key, the systemd credentials folder or the notify socket."""
        monkeypatch.setenv("STRIPE_API_KEY", DEFAULT_API_KEY)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(sandbox.folder / "credentials"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(sandbox.folder / "notify"))
        monkeypatch.setenv("WATCHDOG_USEC", "600000000")
        seen = with_hook(sandbox)
        sandbox.gmail.revoke()
        result = sandbox.cli("once")
        assert result.code == 3
        told = json.loads(seen.read_text())
        assert told["BILLING_RESPONDER_EXIT_CODE"] == "3"
        assert "Gmail authorisation lost" in told["BILLING_RESPONDER_PROBLEM"]
        assert "invalid_grant" in told["BILLING_RESPONDER_PROBLEM"]
        assert told["STRIPE_API_KEY"] is None
        assert told["CREDENTIALS_DIRECTORY"] is None and told["NOTIFY_SOCKET"] is None
        assert told["WATCHDOG_USEC"] is None

    def test_a_token_revoked_while_the_daemon_runs_stops_it_with_3_and_runs_the_hook(
        self, sandbox: Sandbox
    ) -> None:
        """`run` answers, loses its authorisation, exits 3 on its own and tells the hook so."""
        sandbox.set_config("[schedule]\ninterval_seconds = 1")
        seen = with_hook(sandbox)
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        process = start_daemon(sandbox)
        try:
            assert wait_for(sandbox.gmail.sent_messages)
            sandbox.gmail.revoke()
            assert wait_for(lambda: process.poll() is not None)
            _, err = process.communicate(timeout=15)
        finally:
            if process.poll() is None:
                stop(process)
        assert process.returncode == 3, err
        assert any(line.endswith("; to fix it, run: billing-responder auth")
                   for line in err.splitlines())
        told = json.loads(seen.read_text())
        assert told["BILLING_RESPONDER_EXIT_CODE"] == "3"
        assert "invalid_grant" in told["BILLING_RESPONDER_PROBLEM"]

    def test_a_fatal_error_runs_the_hook_with_exit_code_1(self, sandbox: Sandbox) -> None:
        """A Stripe key refused at start: exit 1, and the hook hears exit code 1 and the problem."""
        seen = with_hook(sandbox)
        refuse_stripe_key(sandbox)
        assert sandbox.cli("once").code == 1
        told = json.loads(seen.read_text())
        assert told["BILLING_RESPONDER_EXIT_CODE"] == "1"
        assert told["BILLING_RESPONDER_PROBLEM"].startswith("Stripe:")
        assert "sk_test_wrong" not in told["BILLING_RESPONDER_PROBLEM"]

    def test_a_config_problem_met_while_starting_runs_the_hook_with_exit_code_2(
        self, sandbox: Sandbox
    ) -> None:
        """[metrics] listen on a taken port: exit 2 (systemd will not restart), and the hook hears exit code 2 and the key; a usage mistake would not call it."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            seen = with_hook(sandbox)
            sandbox.set_config(f'[metrics]\nlisten = "127.0.0.1:{port}"')
            assert sandbox.cli("once", "--review", str(sandbox.folder / "r")).code == 2
            assert not seen.exists()  # --review without --dry-run: the caller's mistake
            result = sandbox.cli("run")
        assert result.code == 2, result.stderr
        told = json.loads(seen.read_text())
        assert told["BILLING_RESPONDER_EXIT_CODE"] == "2"
        assert "metrics.listen" in told["BILLING_RESPONDER_PROBLEM"]

    @pytest.mark.parametrize(
        ("program", "logged"),
        [
            ("import sys; sys.exit('pager down')", "exited 1: pager down"),
            ("import time; time.sleep(30)", "did not finish within 0.5 s and was killed"),
        ],
        ids=["fails", "hangs"],
    )
    def test_a_hook_that_fails_or_hangs_is_logged_and_the_exit_code_stays_3(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, program: str, logged: str
    ) -> None:
        """The notification never changes the outcome: exit 3 still, and a WARNING saying what the hook did."""
        monkeypatch.setattr(alerts, "COMMAND_TIMEOUT_SECONDS", 0.5)
        sandbox.set_config(f"[notify]\ncommand = {hook_command(program)}")
        sandbox.gmail.revoke()
        result = sandbox.cli("once")
        assert result.code == 3
        assert "WARNING" in result.stderr and logged in result.stderr
        assert any(line.endswith("; to fix it, run: billing-responder auth")
                   for line in result.stderr.splitlines())

    def test_a_hook_that_cannot_start_is_logged(self, sandbox: Sandbox) -> None:
        """A program that does not exist: exit 3 unchanged, a WARNING naming it."""
        missing = sandbox.folder / "no-such-pager"
        sandbox.set_config(f'[notify]\ncommand = ["{missing}"]')
        sandbox.gmail.revoke()
        result = sandbox.cli("once")
        assert result.code == 3
        assert f"[notify] command {missing} could not be started" in result.stderr


class TestEmail:
    def test_a_working_mailbox_emails_the_operator_an_auto_generated_notice(
        self, sandbox: Sandbox
    ) -> None:
        """Service account, Stripe key refused: exit 1 and one plain notice To the operator, marked auto-generated."""
        use_service_account(sandbox)
        sandbox.set_config(f'[notify]\nemail = "{NOTIFY}"')
        refuse_stripe_key(sandbox)
        assert sandbox.cli("once").code == 1
        (sent,) = sandbox.gmail.sent_messages()
        message = sent.message
        assert message["To"] == NOTIFY
        assert message["Subject"] == "billing-responder stopped: a fatal error"
        assert message["Auto-Submitted"] == "auto-generated"
        assert message["In-Reply-To"] is None and message["References"] is None
        text = message.get_body(preferencelist=("plain",)).get_content()
        assert "Problem: Stripe:" in text and "exit code 1" in text
        assert "billing.stripe.com" not in text and "sk_test_wrong" not in text
        assert all(g.grant_type.endswith("jwt-bearer") for g in sandbox.gmail.oauth.grants())

    def test_a_dry_run_mails_no_notice_but_runs_the_hook(self, sandbox: Sandbox) -> None:
        """`once --dry-run` stopped by a refused Stripe key: exit 1, the hook is told, and Gmail sends nothing (a dry run sends nothing)."""
        use_service_account(sandbox)
        seen = with_hook(sandbox, email=NOTIFY)
        refuse_stripe_key(sandbox)
        result = sandbox.cli("once", "--dry-run")
        assert result.code == 1
        assert sandbox.gmail.sent_messages() == []
        assert not [r for r in sandbox.gmail.requests if r.method == "POST" and "send" in r.path]
        assert "dry run: no notice mailed" in result.stderr
        assert json.loads(seen.read_text())["BILLING_RESPONDER_EXIT_CODE"] == "1"

    def test_a_lost_authorisation_cannot_email_so_it_says_so_and_the_hook_still_runs(
        self, sandbox: Sandbox
    ) -> None:
        """Revoked token: nothing can be sent; a WARNING says so; the hook is told anyway; exit 3."""
        seen = with_hook(sandbox, email=NOTIFY)
        sandbox.gmail.revoke()
        result = sandbox.cli("once")
        assert result.code == 3
        assert sandbox.gmail.sent_messages() == []
        assert "[notify] cannot email" in result.stderr and "relying on the [notify] command" in (
            result.stderr
        )
        assert json.loads(seen.read_text())["BILLING_RESPONDER_EXIT_CODE"] == "3"

    def test_a_notice_sent_to_the_support_inbox_itself_is_never_answered(
        self, sandbox: Sandbox
    ) -> None:
        """Notified at its own address, the responder later finds the notice and leaves it unanswered."""
        sandbox.set_config(f'[notify]\nemail = "{MAILBOX}"')
        refuse_stripe_key(sandbox)
        assert sandbox.cli("once").code == 1
        assert len(sandbox.gmail.sent_messages()) == 1
        (sandbox.folder / "stripe.key").write_text(DEFAULT_API_KEY)
        result = sandbox.cli("once")
        assert result.code == 0, result.stderr
        assert len(sandbox.gmail.sent_messages()) == 1  # the notice itself, no reply to it

    def test_no_notification_config_sends_and_runs_nothing(self, sandbox: Sandbox) -> None:
        """Without [notify], a failure sends no mail: the mailbox only ever sends replies."""
        refuse_stripe_key(sandbox)
        assert sandbox.cli("once").code == 1
        assert sandbox.gmail.sent_messages() == []


class TestMessage:
    def test_the_fix_for_lost_authorisation_is_the_auth_command(self) -> None:
        """Exit 3's notice is titled for lost authorisation and names `billing-responder auth`."""
        message = alerts.alert_message(
            "Gmail authorisation lost: invalid_grant", 3, to=NOTIFY, host="mail1",
            config_path="/etc/billing-responder/config.toml", now=datetime(2025, 1, 2, tzinfo=UTC),
        )
        assert message["Subject"] == "billing-responder stopped: Gmail authorisation lost"
        text = message.get_content()
        assert "billing-responder auth" in text and "on mail1" in text
        assert "/etc/billing-responder/config.toml" in text

    def test_anything_shaped_like_a_secret_is_scrubbed_from_the_problem(self) -> None:
        """Stripe keys, Google tokens and portal links in a problem line never reach a notice."""
        problem = (
            "Stripe: key sk_live_51Habc0123456789 refused; token ya29.a0AfB_x-y; refresh "
            "1//0gAbc-d_e; portal https://billing.stripe.com/p/session/test_YWNjdF8x"
        )
        scrubbed = alerts.scrub(problem)
        for secret in ("sk_live_", "ya29.", "1//0g", "billing.stripe.com"):
            assert secret not in scrubbed
        assert scrubbed.startswith("Stripe: key [redacted] refused")
