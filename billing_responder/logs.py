"""Logging: stderr, one line per event, and email addresses masked.

Portal URLs never reach a log call at all (the pipeline never passes one); addresses do, so they
are masked at the call site with :func:`mask_address`: logs end up in the journal and in bug
reports, where a customer's address does not belong.
"""

from __future__ import annotations

import logging
import sys


def mask_address(address: str) -> str:
    """``jane.doe@example.com`` → ``j***@example.com``; something unparseable → ``***``."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "***"
    return f"{local[0]}***@{domain}"


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level``; quiet the client libraries' own chatter."""
    handler = _OwnHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # Replace only our own handler, so calling this twice (tests, the demo) never doubles lines
    # and handlers others installed (pytest's capture) stay.
    for old in [h for h in root.handlers if isinstance(h, _OwnHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # stripe-python and the Google client log request lines (with query strings) at INFO/DEBUG.
    for noisy in ("stripe", "googleapiclient", "google_auth_httplib2", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _OwnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler billing-responder installs."""
