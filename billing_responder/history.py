"""`billing-responder history`: the audit log from the ledger (stub)."""

from __future__ import annotations

from typing import TextIO

from billing_responder.config import Config
from billing_responder.errors import UsageError


def run_history(
    config: Config,
    *,
    since: str | None,
    decision: str | None,
    as_json: bool,
    full: bool,
    limit: int,
    out: TextIO,
) -> int:
    """Print the ledger's entries, newest first, as a table or JSON lines; the exit code."""
    raise UsageError("`history` is not built yet")
