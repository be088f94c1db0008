"""`billing-responder auth`: authorise the Gmail mailbox and write ``[gmail] token_file``.

Google's installed-app flow, through google-auth-oauthlib: a one-request web server on
``localhost:PORT`` waits while the mailbox's owner opens Google's consent page (in a browser this
command opens, or -- ``--no-browser``, on a headless server -- at a URL it prints, through an SSH
tunnel to that port). Google sends the browser back to the local server with a code, which is
exchanged (with the PKCE verifier) for a refresh token. Then the token is written (0600, by
rename) and proven: users.getProfile through the same client the responder uses, so the printed
mailbox address is the one the responder will answer for.

Consent is always asked for again (``prompt=consent``): Google hands out a refresh token only at
consent, so re-running `auth` after a revocation must not be answered with an access token alone.

With ``[gmail] service_account_file`` set there is nothing to authorise in a browser: a Workspace
admin delegated the mailbox to the service account. `auth` then checks that delegation works and
says what to fix if it does not.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import sys
import urllib.parse
import webbrowser
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from google_auth_oauthlib.flow import InstalledAppFlow
from oauthlib.oauth2.rfc6749.errors import (  # type: ignore[import-untyped]
    AccessDeniedError,
    MismatchingStateError,
    OAuth2Error,
)

from billing_responder.config import Config
from billing_responder.errors import (
    ConfigError,
    FatalServiceError,
    GmailAuthError,
    ServiceUnavailableError,
    UsageError,
)
from billing_responder.gmail import SCOPES, GmailMailbox, load_credentials, save_credentials

log = logging.getLogger(__name__)

EXIT_OK = 0
_CLIENT_KEYS = ("client_id", "client_secret", "auth_uri", "token_uri")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_CREATE_CLIENT = (
    "create an OAuth client ID of type Desktop app in the Google Cloud console (APIs & Services "
    "> Credentials) and download its JSON (README: Gmail credentials)"
)
# These log, at DEBUG, the token request's headers and body and the token response: the client
# secret, the code, the refresh token. Nothing of theirs is worth that.
_QUIET_LOGGERS = ("google_auth_oauthlib", "requests_oauthlib", "oauthlib")


def run_auth(
    config: Config, *, open_browser: bool, port: int, client_secrets: Path | None
) -> int:
    """Run the OAuth installed-app flow and write ``[gmail] token_file`` (0600); the exit code."""
    if config.gmail.service_account_file is not None:
        return _check_service_account(config, config.gmail.service_account_file)
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a port number (1-65535)")
    client = _client_config(config, client_secrets)
    installed = client["installed"]
    if config.gmail.token_uri:
        installed["token_uri"] = config.gmail.token_uri
    if open_browser and not _browser_available():
        print("No web browser found here: open the URL below yourself.")
        open_browser = False
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # The URL must reach a pipe (`| tee`, a script) before the command blocks waiting for it.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)

    flow = InstalledAppFlow.from_client_config(client, scopes=list(SCOPES))
    with _oauthlib_transport(installed["auth_uri"], installed["token_uri"]):
        credentials = _consent(flow, port, open_browser=open_browser)

    granted = credentials.granted_scopes  # None: Google did not say, so all that was asked for
    if granted is not None and not set(SCOPES) <= set(granted):
        raise FatalServiceError(
            "Google",
            "the permission to read, send and label mail (gmail.modify) was not granted; run "
            "`billing-responder auth` again and leave its box ticked on the consent page",
        )
    if not credentials.refresh_token:
        raise FatalServiceError("Google", "Google sent no refresh token; nothing was written")

    token_file = config.gmail.token_file
    try:
        save_credentials(credentials, token_file)
    except OSError as exc:
        raise ConfigError(
            str(config.path), "gmail.token_file", f"cannot write {token_file}: {exc.strerror}"
        ) from None
    address = _mailbox_address(config, credentials, after=f"the token was written to {token_file}")
    print(f"Authorised the Gmail mailbox {address}.")
    print(f"Token written to {token_file} (readable by its owner only).")
    return EXIT_OK


def _consent(flow: Any, port: int, *, open_browser: bool) -> Any:
    """The browser round trip and the code exchange; Google's refusals as our errors."""
    try:
        return flow.run_local_server(
            host="localhost",
            port=port,
            open_browser=open_browser,
            authorization_prompt_message=_prompt(port, open_browser),
            success_message="billing-responder: done. You may close this window and go back "
            "to the terminal.",
            # Google issues a refresh token only when the user consents; ask every time.
            prompt="consent",
        )
    # requests' errors are OSErrors too: this clause must come before the port's.
    except requests.RequestException as exc:
        raise ServiceUnavailableError(
            "Google", f"token endpoint unreachable ({type(exc).__name__})"
        ) from None
    except OSError as exc:  # the local port is taken (or not ours to bind)
        raise UsageError(
            f"cannot listen on localhost:{port} ({exc.strerror or exc}); pass another --port"
        ) from None
    except AccessDeniedError:
        raise FatalServiceError(
            "Google", "access was not granted in the browser (access_denied); nothing was written"
        ) from None
    except MismatchingStateError:
        raise FatalServiceError(
            "Google",
            "the browser came back with the answer to another request (state mismatch); "
            "run `billing-responder auth` again",
        ) from None
    except OAuth2Error as exc:
        detail = f"{exc.error}: {exc.description}" if exc.description else exc.error
        raise FatalServiceError("Google", f"authorisation failed ({detail})") from None


def _client_config(config: Config, option: Path | None) -> dict[str, Any]:
    """The OAuth client file, checked: a Desktop-app client with every key the flow needs."""
    path = option if option is not None else config.gmail.client_secrets_file

    def bad(problem: str) -> Exception:
        if option is not None:
            return UsageError(f"--client-secrets {path}: {problem}")
        return ConfigError(str(config.path), "gmail.client_secrets_file", f"{path}: {problem}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad(f"no such file; {_CREATE_CLIENT}") from None
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise bad("not a JSON file (expected the OAuth client JSON from Google)") from None
    if not isinstance(data, dict):
        raise bad("not an OAuth client file")
    if data.get("type") == "service_account":
        raise bad(
            "this is a service account key; set [gmail] service_account_file and "
            "delegated_user instead (nothing to authorise in a browser)"
        )
    if "web" in data and "installed" not in data:
        raise bad(f"a Web application client cannot use a local redirect; {_CREATE_CLIENT}")
    installed = data.get("installed")
    if not isinstance(installed, dict):
        raise bad(f"not an OAuth client file; {_CREATE_CLIENT}")
    missing = [k for k in _CLIENT_KEYS if not isinstance(installed.get(k), str) or not installed[k]]
    if missing:
        raise bad(f"the client lacks {', '.join(missing)}; download it again")
    for key in ("auth_uri", "token_uri"):
        if not _secure_or_loopback(installed[key]):
            raise bad(f"{key} must be an https URL (http only on 127.0.0.1 or localhost)")
    if config.gmail.token_uri and not _secure_or_loopback(config.gmail.token_uri):
        raise ConfigError(
            str(config.path), "gmail.token_uri", "must be https (http only on 127.0.0.1)"
        )
    return {"installed": dict(installed)}


def _secure_or_loopback(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK)


@contextlib.contextmanager
def _oauthlib_transport(*urls: str) -> Iterator[None]:
    """oauthlib's switches, set only while the flow runs.

    It refuses plain-http endpoints, which the sandbox's loopback emulator is (checked above to
    be loopback). And it raises when the granted scopes differ from those asked for -- which
    Google's consent page lets a user cause by unticking a box -- where we want to say so.
    """
    wanted = {"OAUTHLIB_RELAX_TOKEN_SCOPE": "1"}
    if any(url.startswith("http://") for url in urls):
        wanted["OAUTHLIB_INSECURE_TRANSPORT"] = "1"
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _browser_available() -> bool:
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


def _prompt(port: int, open_browser: bool) -> str:
    """What run_local_server prints, with ``{url}`` filled in by it."""
    if open_browser:
        return (
            "Your browser has been opened to authorise the Gmail mailbox. "
            "If it did not open, visit:\n\n    {url}\n"
        )
    where = f"{getpass.getuser()}@{socket.gethostname()}"
    return (
        "Open this URL in a browser and allow access for the support mailbox:\n\n"
        "    {url}\n\n"
        f"Google then sends the browser to http://localhost:{port}/, where this command waits.\n"
        "If the browser runs on another computer, first forward that port from there, e.g.:\n\n"
        f"    ssh -L {port}:localhost:{port} {where}\n"
    )


def _mailbox_address(config: Config, credentials: Any, *, after: str) -> str:
    """users.getProfile with ``credentials`` through the responder's own client."""
    try:
        mailbox = GmailMailbox(config.gmail, credentials)
        try:
            return mailbox.address()
        finally:
            mailbox.close()
    except FatalServiceError as exc:  # refused, or unreachable: either way, say what was done
        raise FatalServiceError("Gmail", f"{after}, but Gmail did not confirm it: {exc}") from None


def _check_service_account(config: Config, key_file: Path) -> int:
    user = config.gmail.delegated_user
    print(
        f"[gmail] service_account_file is set: a service account acts as {user} through "
        "domain-wide delegation, so there is nothing to authorise in a browser."
    )
    try:
        credentials = load_credentials(config.gmail)
    except GmailAuthError as exc:
        raise ConfigError(
            str(config.path), "gmail.service_account_file", str(exc).removeprefix("Gmail: ")
        ) from None
    account = getattr(credentials, "service_account_email", "")
    try:
        mailbox = GmailMailbox(config.gmail, credentials)
        try:
            address = mailbox.address()
        finally:
            mailbox.close()
    except GmailAuthError as exc:
        if "unauthorized_client" not in str(exc):
            raise ConfigError(
                str(config.path),
                "gmail.service_account_file",
                f"Google refused the service account {account}: {exc}",
            ) from None
        raise ConfigError(
            str(config.path),
            "gmail.delegated_user",
            f"the service account {account} may not act as {user}: in the Google Admin console "
            f"(Security > Access and data control > API controls > Domain-wide delegation), add "
            f"its client ID {_client_id(key_file)} with the scope {SCOPES[0]}",
        ) from None
    print(f"Checked: the service account {account} reads the Gmail mailbox {address}.")
    return EXIT_OK


def _client_id(key_file: Path) -> str:
    """The service account's numeric client ID, which the Admin console asks for."""
    try:
        return str(json.loads(key_file.read_text(encoding="utf-8"))["client_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return "(see client_id in the key file)"
