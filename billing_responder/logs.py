"""Logging: stderr, one line per event, and email addresses masked.

Portal URLs never reach a log call at all (the pipeline never passes one). Addresses do, in
messages and in triage reasons, so the formatter masks every address-shaped string in the final
line: logs end up in the journal and in bug reports, where a customer's address does not belong.
The owner-facing outputs (the dry-run review, `once`'s report on stdout) show them in full.
"""

from __future__ import annotations

import logging
import re
import sys

_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")


def mask_address(address: str) -> str:
    """``jane.doe@example.com`` → ``j***@example.com``; something unparseable → ``***``."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "***"
    return f"{local[0]}***@{domain}"


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level``; quiet the client libraries' own chatter."""
    handler = _OwnHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # Replace only our own handler, so calling this twice (tests, the demo) never doubles lines
    # and handlers others installed (pytest's capture) stay.
    for old in [h for h in root.handlers if isinstance(h, _OwnHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # stripe-python and the Google client log request lines (with query strings) at INFO/DEBUG.
    # "google" too: google-auth's request logging at DEBUG would include a send's raw body,
    # which holds the portal URL.
    for noisy in ("stripe", "google", "googleapiclient", "google_auth_httplib2", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _OwnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler billing-responder installs."""


class MaskingFormatter(logging.Formatter):
    """A formatter that masks every email address in the formatted line (tracebacks included)."""

    def format(self, record: logging.LogRecord) -> str:
        return _ADDRESS.sub(lambda m: mask_address(m.group(0)), super().format(record))
