"""Gmail's token endpoint failing us versus refusing us, and who owns the token file afterwards.

google-auth raises the same ``RefreshError`` when the token endpoint is down (429, 5xx, an error
page) as when it refuses the credential (``invalid_grant``...). Only a refusal is "authorisation
lost", exit 3, which systemd never restarts (``RestartPreventExitStatus=2 3``); an outage reported
as one would stop the service for good. Every refresh here is the real google-auth client's,
against the Gmail emulator's token endpoint, with faults injected there.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from billing_responder.sandbox._http import Fault
from tests.conftest import NOBODY, Sandbox, needs_root
from tests.test_auth import answerable_mail, use_service_account
from tests.test_check import lines, run_check
from tests.test_cli import start_daemon, stop, wait_for

TOKEN = r"^/token$"
#: google-auth tries the token endpoint three times (1 s and 2 s apart) for an answer it deems
#: worth repeating, so a fault meant to fail one refresh answers three requests.
ONE_REFRESH = 3
HTML = {"Content-Type": "text/html; charset=UTF-8"}


def outage(kind: str) -> Fault:
    """A token endpoint failing one refresh: as JSON (``temporarily_unavailable``), or as the
    bare error page of a front end whose endpoint behind it is down."""
    status, _, shape = kind.partition("-")
    headers = HTML if shape == "page" else {}
    return Fault(int(status), method="POST", path=TOKEN, times=ONE_REFRESH, headers=headers)


def assert_no_auth_blame(stderr: str) -> None:
    assert "authorisation lost" not in stderr
    assert "billing-responder auth" not in stderr


class TestTokenEndpointOutage:
    @pytest.mark.parametrize("kind", ["503", "429", "503-page", "502-page"])
    def test_once_exits_1_not_3_and_the_next_run_answers(self, sandbox: Sandbox, kind: str) -> None:
        """A token endpoint failing (503, 429, an HTML error page) is an outage: `once` exits 1 without asking for re-authorisation, sends nothing, and the next run answers."""
        answerable_mail(sandbox)
        sandbox.gmail.inject_fault(outage(kind))

        first = sandbox.cli("once")

        assert first.code == 1, first.stderr
        assert_no_auth_blame(first.stderr)
        assert "Gmail: the token endpoint gave no access token" in first.stderr
        assert sandbox.gmail.sent_messages() == []
        sandbox.gmail.clear_faults()  # a 502 page is not repeated by google-auth: faults left
        second = sandbox.cli("once")
        assert second.code == 0, second.stderr
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_an_error_page_shows_as_its_title_not_as_markup(self, sandbox: Sandbox) -> None:
        """An HTML error page from the token endpoint is reported by its title on one line, without the page's markup."""
        sandbox.gmail.inject_fault(outage("503-page"))

        result = sandbox.cli("once")

        assert result.code == 1, result.stderr
        (line,) = [x for x in result.stderr.splitlines() if "token endpoint" in x]
        assert "an error page: Error 503 (Service Unavailable)!!1" in line
        assert "<" not in line and "style" not in line

    def test_a_service_accounts_grant_failing_is_an_outage_too(self, sandbox: Sandbox) -> None:
        """The JWT-bearer grant of a service account answered 503: exit 1, not 3."""
        use_service_account(sandbox)
        sandbox.gmail.inject_fault(outage("503"))

        result = sandbox.cli("once")

        assert result.code == 1, result.stderr
        assert_no_auth_blame(result.stderr)

    def test_check_blames_the_network_not_the_authorisation(self, sandbox: Sandbox) -> None:
        """`check` during a token endpoint outage: Gmail authorisation ✗ pointing at the network, not at `billing-responder auth`."""
        sandbox.gmail.inject_fault(outage("503"))

        line = lines(run_check(sandbox))["Gmail authorisation"]

        assert line.startswith("✗")
        assert "check the network" in line and "billing-responder auth" not in line

    def test_the_daemon_fails_one_cycle_and_answers_once_the_endpoint_is_back(
        self, sandbox: Sandbox
    ) -> None:
        """Under `run`, a refresh the token endpoint answers 503 fails a cycle, not the daemon: it keeps running and answers the next cycle."""
        sandbox.set_config("[schedule]\ninterval_seconds = 1")
        process = start_daemon(sandbox)
        try:
            assert wait_for(lambda: sandbox.gmail.units_used > 0 and process.poll() is None)
            # Every access token expired: the next call gets a 401 and the client refreshes.
            fault = sandbox.gmail.inject_fault(outage("503"))
            sandbox.gmail.expire_access_tokens()
            answerable_mail(sandbox)
            assert wait_for(sandbox.gmail.sent_messages, seconds=40)
            alive = process.poll() is None
        finally:
            code, _, _, err = stop(process)
        assert alive and code == 0, err
        assert fault.times == 0
        assert_no_auth_blame(err)
        assert "Gmail: the token endpoint gave no access token" in err
        assert len(sandbox.gmail.sent_messages()) == 1


class TestRefusedCredential:
    @pytest.mark.parametrize(
        ("status", "code"),
        [
            (400, "invalid_grant"),
            (401, "invalid_client"),
            (401, "unauthorized_client"),
            (400, "invalid_scope"),
            (403, "access_denied"),
        ],
    )
    def test_a_refusal_still_exits_3_asking_for_auth(
        self, sandbox: Sandbox, status: int, code: str
    ) -> None:
        """A token endpoint refusing the credential is no outage: `once` exits 3, naming the code and `billing-responder auth`."""
        sandbox.gmail.inject_fault(Fault(status, method="POST", path=TOKEN, reason=code))

        result = sandbox.cli("once")

        assert result.code == 3, result.stderr
        assert code in result.stderr
        assert "run: billing-responder auth" in result.stderr


class TestTokenFileOwner:
    @needs_root
    def test_a_refresh_by_root_leaves_the_token_file_to_its_owner(self, sandbox: Sandbox) -> None:
        """Root running `once` on the service user's token file (65534, 0600) writes the new token into a file still owned by 65534, mode 0600. Skipped unless root, which is acceptable only because CI runs the suite as root."""
        token_file = sandbox.folder / "token.json"
        os.chown(token_file, NOBODY, NOBODY)
        token_file.chmod(0o600)
        before = json.loads(token_file.read_text(encoding="utf-8"))

        result = sandbox.cli("once")

        assert result.code == 0, result.stderr
        after = token_file.stat()
        assert (after.st_uid, after.st_gid) == (NOBODY, NOBODY)
        assert stat.S_IMODE(after.st_mode) == 0o600
        written = json.loads(token_file.read_text(encoding="utf-8"))
        assert written["token"] and written["token"] != before.get("token")
        assert written["refresh_token"] == before["refresh_token"]
