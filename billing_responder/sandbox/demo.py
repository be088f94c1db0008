"""`billing-responder demo`: the real pipeline, real clients, local emulators, no credentials.

It starts the Gmail and Stripe emulators on 127.0.0.1, seeds a realistic inbox, writes a throwaway
config, token file and key file into a temporary folder, and runs the very code `once` runs: two
cycles, to show that the second one sends nothing more. Then it prints, message by message, what
was decided and the reply as the Gmail emulator received it.
"""

from __future__ import annotations

import json
import tempfile
import textwrap
from email.message import EmailMessage
from pathlib import Path
from typing import TextIO

from billing_responder.config import load_config
from billing_responder.pipeline import Outcome
from billing_responder.sandbox.gmail import GmailEmulator
from billing_responder.sandbox.inbox import MAILBOX, Seeded, seed
from billing_responder.sandbox.stripe import DEFAULT_API_KEY, StripeEmulator
from billing_responder.service import build_service

#: What the sandbox config says for an emulator that enforces no quota: pace to nothing.
UNLIMITED_QUOTA = 1_000_000


def write_sandbox_config(folder: Path, gmail: GmailEmulator, stripe: StripeEmulator) -> Path:
    """A config, token file and key file pointing at the emulators; returns the config path."""
    token = {
        "refresh_token": gmail.refresh_token,
        "client_id": "sandbox-client.apps.googleusercontent.com",
        "client_secret": "sandbox-client-secret",
        "token_uri": f"{gmail.url}/token",
    }
    for name, text in (("token.json", json.dumps(token)), ("stripe.key", DEFAULT_API_KEY)):
        # As a deployment keeps them: readable by the service user only (else a warning).
        (folder / name).write_text(text, encoding="utf-8")
        (folder / name).chmod(0o600)
    config = f"""\
[gmail]
token_file = "token.json"
token_uri = "{gmail.url}/token"
api_endpoint = "{gmail.url}"
# The responder paces itself to this; the emulator enforces a quota only when given one.
quota_units_per_minute = {gmail.quota_units_per_minute or UNLIMITED_QUOTA}

[stripe]
api_base = "{stripe.url}"
api_key_file = "stripe.key"
return_url = "https://acme-saas.test/account"

[reply]
from_name = "Acme Support"
signature = "The Acme support team"

[state]
database = "state.db"
"""
    path = folder / "config.toml"
    path.write_text(config, encoding="utf-8")
    return path


def run_demo(out: TextIO) -> int:
    """Run the demo, writing the account to ``out``; returns the exit code."""
    with (
        tempfile.TemporaryDirectory(prefix="billing-responder-demo-") as tmp,
        GmailEmulator(address=MAILBOX) as gmail,
        StripeEmulator() as stripe,
    ):
        seeded = seed(gmail, stripe)
        config = load_config(write_sandbox_config(Path(tmp), gmail, stripe))
        _say(out, f"billing-responder demo: local Gmail at {gmail.url}, Stripe at {stripe.url}")
        _say(out, f"Inbox {MAILBOX}: {len(seeded)} messages. Running one cycle...\n")

        outcomes: dict[str, Outcome] = {}
        service = build_service(config, dry_run=False)
        try:
            first = service.cycle(on_outcome=lambda o: outcomes.__setitem__(o.ref.id, o))
            second = service.cycle()
        finally:
            service.close()

        sent_by_thread = {s.thread_id: s.message for s in gmail.sent_messages()}
        for number, message in enumerate(seeded, start=1):
            _account(out, number, message, outcomes.get(message.gmail_id), sent_by_thread)

        _say(out, f"First cycle:  {first.summary()}.")
        _say(out, f"Second cycle: {second.summary()} (nothing changed since the first: one "
                  "history.list call; nothing is ever answered twice).")
        _say(out, f"Gmail received {len(gmail.sent_messages())} replies; Stripe minted "
                  f"{len(stripe.portal_sessions())} portal sessions; "
                  f"Gmail quota used: {gmail.units_used} units.")
    return 0


def _account(
    out: TextIO,
    number: int,
    seeded: Seeded,
    outcome: Outcome | None,
    sent_by_thread: dict[str, EmailMessage],
) -> None:
    _say(out, f"[{number}] From {seeded.sender}: {seeded.subject!r}")
    if outcome is None:
        _say(out, "    untouched: the Gmail search does not return it (not about billing)\n")
        return
    status = outcome.status.value.upper()
    reasons = "; ".join(outcome.decision.reasons) if outcome.decision else outcome.error or ""
    _say(out, f"    {status}: {reasons}")
    _say(out, f"    why it matters: {seeded.why}")
    reply = sent_by_thread.get(seeded.thread_id)
    if reply is not None:
        _say(out, "    reply sent in the same thread:")
        for header in ("To", "Subject", "In-Reply-To", "Auto-Submitted"):
            _say(out, f"      {header}: {reply[header]}")
        body = reply.get_body(preferencelist=("plain",))
        text = body.get_content() if isinstance(body, EmailMessage) else ""
        _say(out, textwrap.indent(text.rstrip(), "      | ", predicate=lambda line: True))
    _say(out, "")


def _say(out: TextIO, line: str) -> None:
    out.write(line + "\n")
