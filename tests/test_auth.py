"""`billing-responder auth` and service accounts, end to end against the Gmail emulator's OAuth.

The installed-app flow runs as a user runs it: the command as a subprocess whose stdout is a pipe,
and the test as the browser, opening the printed URL and following Google's redirect back to the
command's local server. What counts is what the emulator recorded and what the token file holds.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import requests
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request
from google.oauth2 import service_account
from google_auth_oauthlib.flow import InstalledAppFlow

from billing_responder.sandbox.gmail_oauth import (
    GMAIL_MODIFY,
    JWT_BEARER,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
)
from billing_responder.sandbox.inbox import MAILBOX, person_mail
from tests.conftest import Sandbox

REPO = Path(__file__).resolve().parents[1]
READONLY = "https://www.googleapis.com/auth/gmail.readonly"
_URL = re.compile(r"^\s+(http://127\.0\.0\.1:\d+/o/oauth2/auth\?\S+)$")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def browse(url: str, *, follow: bool = True) -> requests.Response:
    """What the user's browser does with a URL: GET it, following redirects, no proxies."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, timeout=30, allow_redirects=follow)


@dataclass
class AuthRun:
    """One `auth` subprocess: exit code, what it printed, and the consent URL it showed."""

    code: int
    stdout: str
    stderr: str
    url: str
    port: int


def run_auth_flow(
    sandbox: Sandbox, *args: str, no_browser: bool = True, env: dict[str, str] | None = None
) -> AuthRun:
    """Run `auth` with stdout on a pipe (block-buffered: no PYTHONUNBUFFERED); with
    ``no_browser``, pass --no-browser and, as the user, open the URL it prints."""
    port = free_port()
    environment = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "STRIPE_API_KEY")
    }
    environment.update(env or {})
    command = [sys.executable, "-m", "billing_responder", "--config", str(sandbox.config_path),
               *args, "auth", "--port", str(port)]
    if no_browser:
        command.append("--no-browser")
    errors_path = sandbox.folder / f"auth-{port}.err"
    seen: list[str] = []
    url = ""
    with errors_path.open("w", encoding="utf-8") as errors:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                   stderr=errors, text=True)
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, args=(process.stdout,), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not url and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            match = _URL.match(line.rstrip("\n"))
            if match:
                url = match.group(1)
        if url and no_browser:
            browse(url)
        if url or process.poll() is not None:
            process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        process.stdout.close()
    while (line := lines.get_nowait() if not lines.empty() else None) is not None:
        seen.append(line)
    stderr = errors_path.read_text(encoding="utf-8")
    return AuthRun(process.returncode, "".join(seen), stderr, url, port)


def token_of(sandbox: Sandbox) -> dict[str, object]:
    data = json.loads((sandbox.folder / "token.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture
def fresh(sandbox: Sandbox) -> Sandbox:
    """A sandbox with a client_secret.json for the emulator and no token file yet."""
    (sandbox.folder / "token.json").unlink()
    sandbox.gmail.oauth.write_client_secrets(sandbox.folder / "client_secret.json")
    return sandbox


def answerable_mail(sandbox: Sandbox) -> None:
    sandbox.stripe.add_customer("ada@example.com")
    sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "Where is it?"))


class TestInstalledAppFlow:
    def test_consent_writes_a_0600_token_file_that_once_then_uses(self, fresh: Sandbox) -> None:
        """The browser round trip ends in token.json (0600, the emulator's refresh token), and `once` answers with it."""
        run = run_auth_flow(fresh)
        assert run.code == 0, run.stderr
        token_file = fresh.folder / "token.json"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_of(fresh)
        assert token["refresh_token"] == fresh.gmail.refresh_token
        assert token["client_id"] == SANDBOX_CLIENT_ID
        assert token["scopes"] == [GMAIL_MODIFY]
        assert f"Authorised the Gmail mailbox {MAILBOX}." in run.stdout
        assert str(token_file) in run.stdout
        (grant,) = fresh.gmail.oauth.grants()
        assert (grant.grant_type, grant.error) == ("authorization_code", "")

        answerable_mail(fresh)
        result = fresh.cli("once")
        assert result.code == 0, result.stderr
        assert len(fresh.gmail.sent_messages()) == 1

    def test_the_consent_request_asks_offline_access_with_pkce_and_a_fresh_consent(
        self, fresh: Sandbox
    ) -> None:
        """Google sees gmail.modify only, access_type=offline, prompt=consent and an S256 PKCE challenge."""
        run_auth_flow(fresh)
        (shown,) = fresh.gmail.oauth.authorizations()
        assert shown.scopes == (GMAIL_MODIFY,)
        assert (shown.access_type, shown.prompt) == ("offline", "consent")
        assert shown.code_challenge_method == "S256"
        assert re.fullmatch(r"http://localhost:\d+/", shown.redirect_uri)

    def test_no_browser_prints_the_url_and_the_ssh_tunnel_for_its_port_before_waiting(
        self, fresh: Sandbox
    ) -> None:
        """Through a pipe, the URL and `ssh -L PORT:localhost:PORT ...` arrive while the command still waits."""
        run = run_auth_flow(fresh)
        assert run.url, run.stdout
        before_redirect = run.stdout.split("Authorised")[0]
        assert f"ssh -L {run.port}:localhost:{run.port} " in before_redirect
        assert f"http://localhost:{run.port}/" in before_redirect

    def test_a_second_authorisation_still_gets_a_refresh_token(self, fresh: Sandbox) -> None:
        """Google sends a refresh token only at consent; asking for consent each time keeps `auth` repeatable."""
        assert run_auth_flow(fresh).code == 0
        (fresh.folder / "token.json").unlink()
        second = run_auth_flow(fresh)
        assert second.code == 0, second.stderr
        assert token_of(fresh)["refresh_token"] == fresh.gmail.refresh_token

    def test_reauthorising_after_a_revocation_makes_once_work_again(self, fresh: Sandbox) -> None:
        """Revoked: `once` exits 3 and names `auth`; after `auth`, the same `once` answers."""
        assert run_auth_flow(fresh).code == 0
        answerable_mail(fresh)
        fresh.gmail.revoke()
        lost = fresh.cli("once")
        assert lost.code == 3
        assert lost.stderr.strip().splitlines()[-1].endswith("run: billing-responder auth")
        assert run_auth_flow(fresh).code == 0
        again = fresh.cli("once")
        assert again.code == 0, again.stderr
        assert len(fresh.gmail.sent_messages()) == 1

    def test_gmail_token_uri_overrides_the_client_files_token_endpoint(
        self, fresh: Sandbox
    ) -> None:
        """With [gmail] token_uri set, the code goes there, not to the client file's token_uri."""
        path = fresh.folder / "client_secret.json"
        client = json.loads(path.read_text())
        client["installed"]["token_uri"] = f"http://127.0.0.1:{free_port()}/token"  # nobody
        path.write_text(json.dumps(client))
        run = run_auth_flow(fresh)
        assert run.code == 0, run.stderr
        assert [g.grant_type for g in fresh.gmail.oauth.grants()] == ["authorization_code"]

    def test_an_unreachable_token_endpoint_exits_1_and_does_not_blame_the_port(
        self, fresh: Sandbox
    ) -> None:
        """Consent given but the token endpoint refuses connections: exit 1 saying it is unreachable, not a port problem; nothing written."""
        dead = f"http://127.0.0.1:{free_port()}/token"
        text = fresh.config_path.read_text(encoding="utf-8")
        fresh.config_path.write_text(
            text.replace(f'token_uri = "{fresh.gmail.url}/token"', f'token_uri = "{dead}"')
        )
        run = run_auth_flow(fresh)
        assert run.code == 1, run.stderr
        assert "token endpoint unreachable" in run.stderr
        assert "--port" not in run.stderr and "cannot listen" not in run.stderr
        assert not (fresh.folder / "token.json").exists()

    def test_a_browser_the_command_opens_completes_the_flow(self, fresh: Sandbox) -> None:
        """Without --no-browser the URL goes to $BROWSER, whose visit ends the flow as the user's would."""
        browser = fresh.folder / "browser"
        visit = (
            "import sys, requests\n"
            "s = requests.Session(); s.trust_env = False\n"
            "s.get(sys.argv[1], timeout=30)\n"
        )
        browser.write_text(
            f"#!{sys.executable}\n"
            "import subprocess, sys\n"
            # A browser returns at once and loads the page meanwhile; webbrowser waits for it.
            f"subprocess.Popen([sys.executable, '-c', {visit!r}, sys.argv[1]],"
            " start_new_session=True)\n"
        )
        browser.chmod(0o755)
        run = run_auth_flow(fresh, no_browser=False, env={"BROWSER": str(browser)})
        assert run.code == 0, run.stderr
        assert "Your browser has been opened" in run.stdout
        assert token_of(fresh)["refresh_token"] == fresh.gmail.refresh_token

    def test_nothing_secret_is_printed_even_at_debug_level(self, fresh: Sandbox) -> None:
        """Client secret, code, PKCE verifier, access and refresh tokens appear in no output."""
        run = run_auth_flow(fresh, "--log-level", "DEBUG")
        assert run.code == 0, run.stderr
        exchange = next(r for r in fresh.gmail.requests if r.path == "/token")
        form = {k: v[0] for k, v in exchange.form().items()}
        token = token_of(fresh)
        secrets = {
            "client secret": SANDBOX_CLIENT_SECRET,
            "code": form["code"],
            "code verifier": form["code_verifier"],
            "access token": str(token["token"]),
            "refresh token": fresh.gmail.refresh_token,
        }
        output = run.stdout + run.stderr
        assert "DEBUG" in run.stderr  # the level did apply
        assert [name for name, value in secrets.items() if value in output] == []


class TestAuthFailures:
    def test_denied_consent_exits_1_with_one_line_and_writes_nothing(self, fresh: Sandbox) -> None:
        """access_denied on the redirect: exit 1, one stderr line saying so, no token file."""
        fresh.gmail.oauth.set_consent(allow=False)
        run = run_auth_flow(fresh)
        assert run.code == 1
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "access_denied" in lines[0], run.stderr
        assert not (fresh.folder / "token.json").exists()

    def test_unticked_gmail_permission_exits_1_saying_to_leave_it_ticked(
        self, fresh: Sandbox
    ) -> None:
        """Granular consent without gmail.modify: exit 1, the reason in one line, no token file."""
        fresh.gmail.oauth.set_consent(scopes=())
        run = run_auth_flow(fresh)
        assert run.code == 1
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "gmail.modify" in lines[0] and "ticked" in lines[0]
        assert not (fresh.folder / "token.json").exists()

    def test_missing_client_secrets_exits_2_naming_the_file_and_key(self, sandbox: Sandbox) -> None:
        """No client_secret.json beside the config: exit 2, one line naming it and the config key."""
        result = sandbox.cli("auth", "--no-browser", "--port", str(free_port()))
        assert result.code == 2
        line = result.stderr.strip()
        assert "\n" not in line
        assert str(sandbox.folder / "client_secret.json") in line
        assert "gmail.client_secrets_file" in line and "Desktop app" in line

    def test_missing_client_secrets_option_file_exits_2_naming_it(self, sandbox: Sandbox) -> None:
        """--client-secrets naming a missing file: exit 2, one line naming that file."""
        missing = sandbox.folder / "elsewhere.json"
        result = sandbox.cli("auth", "--no-browser", "--client-secrets", str(missing))
        assert result.code == 2
        assert f"--client-secrets {missing}: no such file" in result.stderr.strip()

    @pytest.mark.parametrize(
        ("content", "says"),
        [
            ("{not json", "not a JSON file"),
            ('{"web": {"client_id": "x"}}', "Web application client"),
            ('{"type": "service_account", "client_email": "x@y"}', "service_account_file"),
            ('{"installed": {"client_id": "x", "auth_uri": "https://a"}}', "client_secret"),
            (
                '{"installed": {"client_id": "x", "client_secret": "s", '
                '"auth_uri": "http://accounts.example/auth", "token_uri": "https://t"}}',
                "auth_uri must be an https URL",
            ),
        ],
        ids=["not-json", "web-client", "service-account-key", "incomplete", "plain-http"],
    )
    def test_unusable_client_file_exits_2_saying_what_is_wrong(
        self, sandbox: Sandbox, content: str, says: str
    ) -> None:
        """A client file the flow cannot use: exit 2, one line naming the file and the problem."""
        path = sandbox.folder / "client_secret.json"
        path.write_text(content)
        result = sandbox.cli("auth", "--no-browser")
        assert result.code == 2
        line = result.stderr.strip()
        assert "\n" not in line and str(path) in line and says in line

    def test_a_taken_port_exits_2_asking_for_another(self, fresh: Sandbox) -> None:
        """The redirect port in use: exit 2 and one line naming the port and --port."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = fresh.cli("auth", "--no-browser", "--port", str(port))
        assert result.code == 2
        assert f"localhost:{port}" in result.stderr and "--port" in result.stderr
        assert "Traceback" not in result.stderr


def use_service_account(sandbox: Sandbox, *, delegated_user: str = MAILBOX) -> Path:
    """Point the sandbox config at a fresh service-account key instead of the token file."""
    key = sandbox.folder / "service-account.json"
    sandbox.gmail.oauth.write_service_account_file(key)
    (sandbox.folder / "token.json").unlink()
    text = sandbox.config_path.read_text().replace(
        'token_file = "token.json"\n',
        f'service_account_file = "{key.name}"\ndelegated_user = "{delegated_user}"\n',
    )
    sandbox.config_path.write_text(text)
    return key


class TestServiceAccount:
    def test_once_answers_through_the_jwt_bearer_grant_as_the_delegated_user(
        self, sandbox: Sandbox
    ) -> None:
        """`once` gets its token by a signed assertion for the mailbox, answers, and writes no token file."""
        use_service_account(sandbox)
        answerable_mail(sandbox)
        result = sandbox.cli("once")
        assert result.code == 0, result.stderr
        assert len(sandbox.gmail.sent_messages()) == 1
        grants = sandbox.gmail.oauth.grants()
        assert grants and all(g.grant_type == JWT_BEARER for g in grants)
        assert {(g.subject, g.scopes, g.error) for g in grants} == {(MAILBOX, (GMAIL_MODIFY,), "")}
        assert not (sandbox.folder / "token.json").exists()

    def test_a_user_not_delegated_exits_3_saying_delegation_is_missing(
        self, sandbox: Sandbox
    ) -> None:
        """sub not covered by delegation: Google's 401 unauthorized_client, exit 3, one clear line."""
        use_service_account(sandbox, delegated_user="someone.else@acme-saas.test")
        result = sandbox.cli("once")
        assert result.code == 3
        problem = result.stderr.strip().splitlines()[-1]
        assert "unauthorized_client" in problem and "domain-wide delegation" in problem
        assert problem.endswith("; to fix it, run: billing-responder auth")
        assert [(g.subject, g.error) for g in sandbox.gmail.oauth.grants()] == [
            ("someone.else@acme-saas.test", "unauthorized_client")
        ]
        assert "Traceback" not in result.stderr

    def test_auth_checks_a_working_service_account_and_exits_0(self, sandbox: Sandbox) -> None:
        """`auth` with a service account opens no browser: it says why, proves access, exits 0."""
        use_service_account(sandbox)
        result = sandbox.cli("auth")
        assert result.code == 0, result.stderr
        assert "nothing to authorise in a browser" in result.stdout
        assert f"reads the Gmail mailbox {MAILBOX}" in result.stdout
        assert sandbox.gmail.oauth.authorizations() == []

    def test_auth_with_an_undelegated_account_exits_2_naming_its_client_id(
        self, sandbox: Sandbox
    ) -> None:
        """The fix needs the account's client ID and the scope: one line with both, exit 2."""
        key = use_service_account(sandbox, delegated_user="someone.else@acme-saas.test")
        client_id = json.loads(key.read_text())["client_id"]
        result = sandbox.cli("auth")
        assert result.code == 2
        line = result.stderr.strip()
        assert "\n" not in line and "gmail.delegated_user" in line
        assert client_id in line and GMAIL_MODIFY in line

    def test_a_broken_key_file_is_exit_3_for_once_and_exit_2_for_auth(
        self, sandbox: Sandbox
    ) -> None:
        """A key file that is not one: `once` says so and exits 3; `auth` names the config key, exit 2."""
        key = use_service_account(sandbox)
        key.write_text('{"type": "service_account"}')
        once = sandbox.cli("once")
        assert once.code == 3
        assert f"{key} is not a service account key file" in once.stderr
        auth = sandbox.cli("auth")
        assert auth.code == 2
        assert "gmail.service_account_file" in auth.stderr and "Traceback" not in auth.stderr


class TestEmulatorOAuth:
    """The emulator refuses what Google refuses, so the tests above could fail."""

    @pytest.fixture(autouse=True)
    def _plain_http(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # oauthlib refuses http endpoints; the emulator is one, on the loopback.
        monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")

    def _code(self, sandbox: Sandbox, flow: InstalledAppFlow) -> str:
        flow.redirect_uri = "http://localhost:1/"
        url, _ = flow.authorization_url(prompt="consent")
        answer = browse(url, follow=False)
        assert answer.status_code == 302
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(answer.headers["Location"]).query)
        return query["code"][0]

    def _flow(self, sandbox: Sandbox) -> InstalledAppFlow:
        path = sandbox.gmail.oauth.write_client_secrets(sandbox.folder / "client_secret.json")
        return InstalledAppFlow.from_client_secrets_file(str(path), scopes=[GMAIL_MODIFY])

    def _exchange(self, sandbox: Sandbox, **form: str) -> tuple[int, dict[str, str]]:
        body = {"grant_type": "authorization_code", "redirect_uri": "http://localhost:1/",
                "client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET} | form
        with requests.Session() as session:
            session.trust_env = False
            answer = session.post(f"{sandbox.gmail.url}/token", data=body, timeout=10)
        return answer.status_code, answer.json()

    def test_a_wrong_pkce_verifier_is_invalid_grant(self, sandbox: Sandbox) -> None:
        """A code bound to an S256 challenge is refused with another verifier, and without one."""
        flow = self._flow(sandbox)
        wrong = self._exchange(sandbox, code=self._code(sandbox, flow), code_verifier="x" * 43)
        assert wrong == (400, {"error": "invalid_grant",
                               "error_description": "Invalid code verifier."})
        missing = self._exchange(sandbox, code=self._code(sandbox, flow))
        assert missing == (400, {"error": "invalid_grant",
                                 "error_description": "Missing code verifier."})

    def test_a_code_works_once_and_only_for_its_client(self, sandbox: Sandbox) -> None:
        """Exchanged once: tokens; again: invalid_grant. A wrong client secret: 401 invalid_client."""
        flow = self._flow(sandbox)
        code = self._code(sandbox, flow)
        verifier = flow.code_verifier
        status, _ = self._exchange(sandbox, code=code, code_verifier=verifier, client_secret="x")
        assert status == 401
        code = self._code(sandbox, flow)
        status, first = self._exchange(sandbox, code=code, code_verifier=verifier)
        assert status == 200 and first["refresh_token"] == sandbox.gmail.refresh_token
        assert self._exchange(sandbox, code=code, code_verifier=verifier)[1]["error"] == (
            "invalid_grant"
        )

    def test_the_refresh_token_covers_only_what_the_user_granted(self, sandbox: Sandbox) -> None:
        """Consent to gmail.readonly alone: refreshing for gmail.modify is invalid_scope, as at Google."""
        flow = self._flow(sandbox)
        flow.oauth2session.scope = [READONLY]
        code = self._code(sandbox, flow)
        status, tokens = self._exchange(sandbox, code=code, code_verifier=flow.code_verifier)
        assert status == 200 and tokens["scope"] == READONLY
        with requests.Session() as session:
            session.trust_env = False
            answer = session.post(f"{sandbox.gmail.url}/token", timeout=10, data={
                "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                "client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET,
                "scope": GMAIL_MODIFY,
            })
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_scope")

    def test_a_redirect_off_this_machine_gets_an_error_page_not_a_redirect(
        self, sandbox: Sandbox
    ) -> None:
        """A Desktop-app client may only come back to a loopback address: 400 page, no code issued."""
        flow = self._flow(sandbox)
        flow.redirect_uri = "https://attacker.example/callback"
        url, _ = flow.authorization_url()
        answer = browse(url, follow=False)
        assert answer.status_code == 400 and "redirect_uri_mismatch" in answer.text
        assert sandbox.gmail.oauth.authorizations() == []

    def test_an_assertion_signed_with_another_key_is_invalid_jwt_signature(
        self, sandbox: Sandbox
    ) -> None:
        """The real google-auth client, its key swapped for another: refresh fails as at Google."""
        real = sandbox.folder / "real.json"
        other = sandbox.folder / "other.json"
        sandbox.gmail.oauth.write_service_account_file(real)
        sandbox.gmail.oauth.write_service_account_file(other)
        forged = json.loads(real.read_text()) | {"private_key": json.loads(other.read_text())[
            "private_key"]}
        credentials = service_account.Credentials.from_service_account_info(
            forged, scopes=[GMAIL_MODIFY], subject=MAILBOX
        )
        with requests.Session() as session:
            session.trust_env = False
            with pytest.raises(RefreshError, match="Invalid JWT Signature"):
                credentials.refresh(Request(session))
        assert [g.error for g in sandbox.gmail.oauth.grants()] == ["invalid_grant"]
