"""`billing-responder auth`: authorise the Gmail mailbox and write the token file (stub)."""

from __future__ import annotations

from pathlib import Path

from billing_responder.config import Config
from billing_responder.errors import UsageError


def run_auth(
    config: Config, *, open_browser: bool, port: int, client_secrets: Path | None
) -> int:
    """Run the OAuth installed-app flow and write ``[gmail] token_file`` (0600); the exit code."""
    raise UsageError("`auth` is not built yet")
