"""Logging: stderr, one line per event, and email addresses masked.

Portal URLs never reach a log call at all (the pipeline never passes one). Addresses do, in
messages and in triage reasons, so the formatter masks every address-shaped string in the final
line, at every level: logs end up in the journal and in bug reports, where a customer's address
does not belong. URL-encoded addresses count too: urllib3's DEBUG request lines carry Stripe
lookups such as ``/v1/customers?email=ada%40example.com``. ``[logging] mask_addresses = false``
turns masking off, for an owner who needs to match log lines to customers. The owner-facing
outputs (the dry-run review, `once`'s report on stdout) always show addresses in full.

Two shapes: ``text``, one line per event -- under systemd, when stderr is the journal's stream
(``JOURNAL_STREAM``), without the timestamp journald adds itself and with the ``<N>`` priority
prefix of sd-daemon(3), so ``journalctl -p warning`` works -- and ``json``, one object per line
for log shippers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

_DOMAIN = r"(?P<{}>[\w-]+(?:\.[\w-]+)+)"
_ADDRESS = re.compile(
    # As written: any RFC 5322 atext in the local part.
    r"(?P<local>[\w.!#$%&'*+/=?^`{|}~-]+)@" + _DOMAIN.format("domain")
    # URL-encoded, "@" as %40: the run stops at an unencoded URL delimiter (? = & /).
    + r"|(?P<encoded>[\w.!$%'*+~-]+)%40" + _DOMAIN.format("edomain")
)
# An encoded quote or colon inside that run ends what came before the address: a search query's
# email%3A%22ada%40example.com%22 (email:"ada@example.com") keeps its shape.
_ENCODED_DELIMITER = re.compile(r"%(?:22|3A)", re.IGNORECASE)


def mask_address(address: str) -> str:
    """``jane.doe@example.com`` → ``j***@example.com``; something unparseable → ``***``."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "***"
    return f"{local[0]}***@{domain}"


def mask_addresses_in(text: str) -> str:
    """``text`` with every address masked; a URL-encoded one stays encoded (``a***%40x.com``)."""

    def masked(match: re.Match[str]) -> str:
        if match["local"] is not None:
            return mask_address(match[0])
        run = match["encoded"]
        cut = max((d.end() for d in _ENCODED_DELIMITER.finditer(run)), default=0)
        return f"{run[:cut]}{run[cut:cut + 1]}***%40{match['edomain']}"

    return _ADDRESS.sub(masked, text)


def setup_logging(
    level: str = "INFO", *, mask_addresses: bool = True, log_format: str = "text"
) -> None:
    """Log to stderr at ``level`` as ``log_format``, addresses masked unless told not to."""
    handler = _OwnHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(mask=mask_addresses))
    elif journal_attached(sys.stderr):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s", mask=mask_addresses))
    else:
        line = "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(MaskingFormatter(line) if mask_addresses else logging.Formatter(line))
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
        return mask_addresses_in(super().format(record))


def journal_attached(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd named in ``$JOURNAL_STREAM``."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor: pytest's capture, a StringIO
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


#: sd-daemon(3) syslog priorities by logging level.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (DEBUG and below: 7)."""
    return next((p for floor, p in _PRIORITIES if levelno >= floor), 7)


class JournalFormatter(logging.Formatter):
    """``<N>name: message`` lines; every line of a traceback carries the prefix too."""

    def __init__(self, fmt: str, *, mask: bool) -> None:
        super().__init__(fmt)
        self._mask = mask

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self._mask:
            text = mask_addresses_in(text)
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception, if any)."""

    def __init__(self, *, mask: bool) -> None:
        super().__init__()
        self._mask = mask

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        if self._mask:
            event = {k: mask_addresses_in(v) if isinstance(v, str) else v for k, v in event.items()}
        return json.dumps(event, ensure_ascii=False)
