"""`billing-responder check`: the go-live checklist (stub)."""

from __future__ import annotations

from typing import TextIO

from billing_responder.config import Config
from billing_responder.errors import UsageError


def run_check(config: Config, out: TextIO) -> int:
    """Print one ✓/✗ line per check; 0 when every check passed, else 1."""
    raise UsageError("`check` is not built yet")
