"""`billing-responder test-reply`: send one real sample reply (stub)."""

from __future__ import annotations

from typing import TextIO

from billing_responder.config import Config
from billing_responder.errors import UsageError


def run_test_reply(config: Config, *, to: str, customer_id: str, out: TextIO) -> int:
    """Send a sample reply with a real portal link for ``customer_id`` to ``to``; the exit code."""
    raise UsageError("`test-reply` is not built yet")
