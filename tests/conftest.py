"""Shared fixtures: the emulators as session-scoped servers, and a ready sandbox per test."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import build

from billing_responder import billing, gmail
from billing_responder.cli import main
from billing_responder.config import Config, load_config
from billing_responder.ledger import SqliteLedger
from billing_responder.sandbox.demo import write_sandbox_config
from billing_responder.sandbox.gmail import GmailEmulator
from billing_responder.sandbox.inbox import MAILBOX
from billing_responder.sandbox.stripe import StripeEmulator

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def gmail_server() -> Iterator[GmailEmulator]:
    """The Gmail emulator, serving on 127.0.0.1 for the whole session (``.url``)."""
    with GmailEmulator(address=MAILBOX) as server:
        yield server


@pytest.fixture(scope="session")
def stripe_server() -> Iterator[StripeEmulator]:
    """The Stripe emulator, serving on 127.0.0.1 for the whole session (``.url``)."""
    with StripeEmulator() as server:
        yield server


@dataclass(frozen=True)
class CliResult:
    """What one `billing-responder` invocation returned and printed."""

    code: int
    stdout: str
    stderr: str


@dataclass
class Sandbox:
    """Both emulators, emptied, and a config folder pointing at them."""

    gmail: GmailEmulator
    stripe: StripeEmulator
    folder: Path
    config_path: Path

    def cli(self, *args: str) -> CliResult:
        """Run `billing-responder --config <sandbox config> ARGS...` in-process."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--config", str(self.config_path), *args])
        return CliResult(code, out.getvalue(), err.getvalue())

    def gmail_api(self) -> Any:
        """The real Gmail client, authorised against the emulator, for acting as a person would."""
        credentials = Credentials(  # type: ignore[no-untyped-call]
            token=self.gmail.issue_access_token(),
            refresh_token=self.gmail.refresh_token,
            client_id="test",
            client_secret="test",
            token_uri=f"{self.gmail.url}/token",
        )
        return build(
            "gmail",
            "v1",
            credentials=credentials,
            client_options={"api_endpoint": self.gmail.url},
            static_discovery=True,
            cache_discovery=False,
        )

    def set_config(self, extra: str) -> None:
        """Append TOML to the sandbox config (new sections only)."""
        with self.config_path.open("a", encoding="utf-8") as handle:
            handle.write("\n" + extra + "\n")


@pytest.fixture
def sandbox(
    gmail_server: GmailEmulator,
    stripe_server: StripeEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Sandbox:
    """Fresh emulator state and a config, token file and key file pointing at the emulators."""
    gmail_server.reset()
    stripe_server.reset()
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    monkeypatch.delenv("BILLING_RESPONDER_CONFIG", raising=False)
    config_path = write_sandbox_config(tmp_path, gmail_server, stripe_server)
    return Sandbox(gmail_server, stripe_server, tmp_path, config_path)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the real retry policies but with millisecond back-off, so fault tests stay quick."""
    for module, name in ((gmail, "GMAIL_RETRY"), (billing, "STRIPE_RETRY")):
        policy = getattr(module, name)
        monkeypatch.setattr(module, name, replace(policy, initial_wait=0.001, max_wait=0.005))


def read_json(text: str) -> object:
    """Parse JSON printed by a command."""
    return json.loads(text)


def text_of(message: EmailMessage) -> str:
    """The plain-text body of a message (a reply, a draft)."""
    return _part(message, "plain")


def html_of(message: EmailMessage) -> str:
    """The HTML body of a message."""
    return _part(message, "html")


def _part(message: EmailMessage, subtype: str) -> str:
    body = message.get_body(preferencelist=(subtype,))
    assert isinstance(body, EmailMessage), f"no text/{subtype} part"
    return str(body.get_content())


NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switches to another user; CI runs the suite as root"
)


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Run the block with effective uid and gid 65534 (root only), as a user the files are
    not for; back to root after."""
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def private_ledger_config(sandbox: Sandbox) -> Config:
    """The sandbox config with its ledger in a folder only root may enter (as a service's private
    state directory is to other users), the ledger created."""
    private = sandbox.folder / "private"
    private.mkdir(mode=0o700)
    SqliteLedger(private / "state.db").close()
    config = load_config(sandbox.config_path)
    return replace(config, state=replace(config.state, database=private / "state.db"))
