"""`billing-responder history`: the audit log from the ledger, as a table or JSON lines.

This is where "why didn't it answer this email?" is answered: every message the responder
decided about, newest first, with its decision, the reasons (the deciding one first) and whether a
reply went out. The ledger is opened read-only; the command never writes anything.

Addresses are masked (``j***@example.com``) unless ``--full``: the output is often pasted into a
ticket or a chat. Portal URLs cannot appear: the ledger holds only the session id.

A missing ledger file is not an error: before the first real cycle there is no history, and the
command says so in one line (naming the file, so a wrong ``[state] database`` shows) and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TextIO

from billing_responder.config import Config
from billing_responder.errors import StateError, UsageError
from billing_responder.ledger import HistoryEntry, SqliteLedger
from billing_responder.logs import mask_address, mask_addresses_in
from billing_responder.model import SENDING, SENT

#: What ``--since`` accepts, for the error message.
SINCE_FORMS = (
    "an age such as 30m, 2h, 3d or 1w (minutes, hours, days, weeks), or an ISO date or time "
    "such as 2024-05-01, 2024-05-01T14:30 or 2024-05-01T14:30+02:00 (UTC unless it says)"
)
_AGE = re.compile(r"(\d{1,6})\s*([mhdw])", re.IGNORECASE)
_AGE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

#: Table widths: a terminal that cannot tell its size is treated as this wide.
FALLBACK_COLUMNS = 120
MIN_COLUMNS = 80
_GAP = "  "


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
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    since_time = parse_since(since, datetime.now(UTC)) if since is not None else None
    path = config.state.database
    try:
        exists = path.exists()  # Python 3.11 raises on EACCES (a folder private to the service)
    except PermissionError:
        exists = True  # there may well be one: os.access below says it is not ours to read
    if not exists:
        print(f"billing-responder: no history yet: {path} does not exist", file=sys.stderr)
        return 0
    # Asked as the user we act as (effective ids), which is who SQLite would open it as.
    if not os.access(path, os.R_OK, effective_ids=True):
        raise StateError(
            f"{path}: not readable by this user (the ledger is private to the service):"
            " run `history` as root or as the service's user"
        )
    ledger = SqliteLedger(path, read_only=True)
    try:
        entries = ledger.history(since=since_time, action=decision, limit=limit)
    finally:
        ledger.close()
    if as_json:
        for entry in entries:
            out.write(json.dumps(entry_json(entry, full=full), ensure_ascii=False) + "\n")
        return 0
    if not entries:
        print("no history entries" + _filters(since_time, decision), file=out)
        return 0
    rows = [table_row(entry, full=full) for entry in entries]
    columns = shutil.get_terminal_size((FALLBACK_COLUMNS, 24)).columns
    color = _isatty(out) and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
    out.write(format_table(rows, max(columns, MIN_COLUMNS), color=color))
    if len(entries) == limit:
        print(f"(the newest {limit} shown; --limit N shows more)", file=out)
    return 0


# -- --since ---------------------------------------------------------------------------------------


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: an age back from ``now`` (``30m``, ``2h``, ``3d``, ``1w``) or an ISO time.

    A date is midnight UTC; a time without an offset is UTC, like the table shows.
    """
    value = text.strip()
    age = _AGE.fullmatch(value)
    try:
        if age is not None:
            delta = timedelta(**{_AGE_UNITS[age[2].lower()]: int(age[1])})
            return now - delta
        moment = datetime.fromisoformat(value)  # a date alone is its midnight
    except (ValueError, OverflowError):
        pass
    else:
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    raise UsageError(f"--since {text!r}: not a time; use {SINCE_FORMS}")


def _filters(since: datetime | None, decision: str | None) -> str:
    said = []
    if since is not None:
        said.append(f"since {since.astimezone(UTC):%Y-%m-%d %H:%M} UTC")
    if decision is not None:
        said.append(f"with decision {decision}")
    return f" ({', '.join(said)})" if said else ""


# -- what one entry says ---------------------------------------------------------------------------


def decision_label(entry: HistoryEntry) -> str:
    """The decision and where the message stands: ``reply``, ``reply (in doubt, 1 failure)``."""
    notes = []
    if entry.state == SENDING:
        notes.append("in doubt")  # a reply was begun; whether Gmail took it is not known yet
    elif entry.state == SENT:
        notes.append("not labelled yet")
    elif entry.action == "deferred":
        notes.append("will retry")
    if entry.failures:
        notes.append(f"{entry.failures} failure" + ("s" if entry.failures != 1 else ""))
    return entry.action + (f" ({', '.join(notes)})" if notes else "")


def reply_sent(entry: HistoryEntry) -> bool | None:
    """Whether Gmail sent a reply: True, False (also for a draft), or None while in doubt."""
    if entry.sent_gmail_id:
        return not entry.reply_drafted
    if entry.state == SENDING:
        return None
    return False


def why(entry: HistoryEntry) -> list[str]:
    """The reasons, the deciding one first, then the last error of a failing message.

    Triage lists what made it decide; later steps (the Stripe lookup, the limits) append the
    reason that settled it, so the newest reason is the one that answers "why".
    """
    reasons = list(reversed(entry.reasons))
    if entry.last_error:
        reasons.insert(0, f"last error: {entry.last_error}")
    return reasons


def entry_json(entry: HistoryEntry, *, full: bool) -> dict[str, object]:
    """Every column of the entry (addresses masked unless ``full``), and ``reply_sent``."""
    hide = (lambda text: text) if full else mask_addresses_in
    return {
        "when": entry.updated_at,
        "gmail_id": entry.gmail_id,
        "thread_id": entry.thread_id,
        "sender": _sender(entry.sender, full),
        "subject": hide(entry.subject),
        "action": entry.action,
        "state": entry.state,
        "decision": decision_label(entry),
        "reasons": [hide(reason) for reason in entry.reasons],
        "reply_sent": reply_sent(entry),
        "reply_drafted": entry.reply_drafted,
        "customer_id": entry.customer_id,
        "portal_session_id": entry.portal_session_id,
        "reply_message_id": entry.reply_message_id,
        "sent_gmail_id": entry.sent_gmail_id,
        "sent_at": entry.sent_at,
        "failures": entry.failures,
        "last_error": hide(entry.last_error) if entry.last_error else None,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
    }


def _sender(sender: str | None, full: bool) -> str | None:
    if sender is None or full:
        return sender
    return mask_address(sender)


# -- the table -------------------------------------------------------------------------------------


HEADINGS = ("WHEN (UTC)", "SENDER", "SUBJECT", "DECISION", "REPLY SENT", "CUSTOMER", "REASONS")
_WHEN, _SENDER, _SUBJECT, _DECISION, _SENT, _CUSTOMER, _REASONS = range(len(HEADINGS))
#: The widest a column gets, whatever its content (the others are as wide as their content).
_CAPS = {_WHEN: 16, _SENDER: 40, _DECISION: 30, _SENT: 10, _CUSTOMER: 24}
#: When the table is wider than the terminal, these columns give way, in this order, down to
#: these widths: in turns, so none is cut to nothing while another keeps plenty. The customer id
#: goes last: cut, it cannot be looked up.
_GIVE_WAY = (
    (_REASONS, 40), (_SUBJECT, 24), (_SENDER, 20), (_REASONS, 28), (_SUBJECT, 18),
    (_SENDER, 14), (_REASONS, 20), (_SUBJECT, 12), (_CUSTOMER, 12), (_REASONS, 12), (_SUBJECT, 8),
)


def table_row(entry: HistoryEntry, *, full: bool) -> tuple[str, ...]:
    """The table's cells for one entry, each made safe for a terminal."""
    hide = (lambda text: text) if full else mask_addresses_in
    cells = (
        _when(entry.updated_at),
        _sender(entry.sender, full) or "-",
        hide(entry.subject) or "-",
        decision_label(entry),
        _sent_cell(entry),
        entry.customer_id or "-",
        hide("; ".join(why(entry))) or "-",
    )
    return tuple(terminal_safe(cell) for cell in cells)


def _sent_cell(entry: HistoryEntry) -> str:
    if entry.reply_drafted:
        return "draft"  # left in the thread for a person to send (draft mode)
    sent = reply_sent(entry)
    return "in doubt" if sent is None else "yes" if sent else "no"


def format_table(rows: Sequence[tuple[str, ...]], columns: int, *, color: bool = False) -> str:
    """The rows under their headings, fitted to ``columns`` where it can be done.

    Each column is as wide as its widest cell (up to a cap); when that is too wide, the columns
    in ``_GIVE_WAY`` are narrowed in turn. A terminal too narrow even then wraps the lines.
    """
    widths = [
        min(_CAPS.get(i, columns), max(display_width(c) for c in (heading, *(r[i] for r in rows))))
        for i, heading in enumerate(HEADINGS)
    ]
    excess = sum(widths) + len(_GAP) * (len(widths) - 1) - columns
    for index, floor in _GIVE_WAY:
        if excess <= 0:
            break
        cut = min(excess, max(0, widths[index] - floor))
        widths[index] -= cut
        excess -= cut
    lines = [_line(HEADINGS, widths, bold=color)]
    lines.extend(_line(row, widths, decision_color=color) for row in rows)
    return "".join(line + "\n" for line in lines)


def _line(
    cells: tuple[str, ...], widths: list[int], *, bold: bool = False, decision_color: bool = False
) -> str:
    fitted = [fit(cell, width) for cell, width in zip(cells, widths, strict=True)]
    if decision_color:
        fitted[_DECISION] = _colored(fitted[_DECISION])
    line = _GAP.join(fitted).rstrip()
    return f"\x1b[1m{line}\x1b[0m" if bold else line


def _colored(cell: str) -> str:
    word = cell.split(" ", 1)[0]
    code = {"reply": "32", "escalate": "33", "deferred": "31"}.get(word)
    if "in doubt" in cell:
        code = "31"
    return f"\x1b[{code}m{cell}\x1b[0m" if code else cell


def _when(stamp: str) -> str:
    try:
        return f"{datetime.fromisoformat(stamp).astimezone(UTC):%Y-%m-%d %H:%M}"
    except ValueError:
        return stamp


# -- text in a terminal ----------------------------------------------------------------------------

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def terminal_safe(text: str) -> str:
    """``text`` on one line with nothing a terminal would act on.

    Header-derived text is the sender's to choose: an escape sequence could recolour, retitle or
    clear the operator's terminal, and a bidi override could make a line read differently from
    what it says. Controls and format characters become U+FFFD, line breaks a space.
    """
    return "".join(
        " " if ch in "\t\n\r" else "\ufffd" if unicodedata.category(ch) in _UNSAFE_CATEGORIES
        else ch
        for ch in text
    )


def display_width(text: str) -> int:
    """How many terminal cells ``text`` takes (wide East Asian characters two, marks none)."""
    return sum(_char_width(ch) for ch in text)


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells (ending in "…" when cut), padded with spaces to it."""
    if display_width(text) > width:
        kept, used = [], 0
        for ch in text:
            cells = _char_width(ch)
            if used + cells > width - 1:
                break
            kept.append(ch)
            used += cells
        text = "".join(kept) + "…"
    return text + " " * (width - display_width(text))


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
