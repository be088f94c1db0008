"""The ledger: a SQLite file that says what happened to every message the responder looked at.

It is the only memory the responder has, so it is what makes "never process a message twice"
true across restarts. One row per Gmail message, moving through these states:

    (no row) ──decide skip/escalate──► done
    (no row) ──decide reply──► sending ──Gmail accepted the reply──► sent ──labelled──► done

The reply's own ``Message-ID`` is chosen and written *before* the portal session is minted and
the reply sent (state ``sending``), so a crash anywhere after that leaves a row that says exactly
what to look for in the mailbox instead of a guess. Portal URLs are credentials and are never
stored: only the session id is.

A dry run opens the file read-only and must leave no trace: SQLite in WAL mode would create
``-wal``/``-shm`` files beside it even for a reader, owned by whoever ran the dry run, so when no
writer is active (no ``-wal`` file) the file is opened ``immutable``, which creates nothing.

Schema changes are named migrations, each applied in a transaction together with its record in
``schema_migrations`` (the sqlite-utils way), so ``migrations()`` can list what is applied.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from billing_responder.errors import StateError
from billing_responder.model import DONE, SENDING, SENT, Decision, LedgerEntry

__all__ = ["DONE", "SENDING", "SENT", "HistoryEntry", "LedgerEntry", "SqliteLedger"]

_MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_messages",
        """
        CREATE TABLE messages (
            gmail_id          TEXT PRIMARY KEY,
            thread_id         TEXT NOT NULL,
            sender            TEXT,
            subject           TEXT NOT NULL DEFAULT '',
            action            TEXT NOT NULL,
            reasons           TEXT NOT NULL,
            state             TEXT NOT NULL,
            customer_id       TEXT,
            portal_session_id TEXT,
            reply_message_id  TEXT,
            sent_gmail_id     TEXT,
            failures          INTEGER NOT NULL DEFAULT 0,
            last_error        TEXT,
            created_at        TEXT NOT NULL,
            updated_at        TEXT NOT NULL
        );
        CREATE INDEX messages_thread ON messages (thread_id);
        CREATE INDEX messages_sender ON messages (sender);
        """,
    ),
    (
        # What the responder knows about the mailbox as a whole, one row per key: today only
        # ``history_id``, where the next cycle's users.history.list starts.
        "0002_mailbox_state",
        """
        CREATE TABLE mailbox_state (
            key        TEXT PRIMARY KEY,
            value      TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        """,
    ),
    (
        # When Gmail accepted the reply, set once: the limits count replies by it.
        "0003_sent_at",
        """
        ALTER TABLE messages ADD COLUMN sent_at TEXT;
        UPDATE messages SET sent_at = updated_at WHERE sent_gmail_id IS NOT NULL;
        """,
    ),
    (
        # `billing-responder history` reads the newest rows first, often since a time: this lets
        # SQLite walk the index backwards and stop at the limit instead of sorting the table.
        "0004_messages_updated_at_index",
        """
        CREATE INDEX messages_updated_at ON messages (updated_at);
        """,
    ),
    (
        # Draft mode: the reply was left as a Gmail draft for a person to send. The ledger counts
        # it as the reply all the same; `history` says which it was. Older rows were all sent.
        "0005_reply_drafted",
        """
        ALTER TABLE messages ADD COLUMN reply_drafted INTEGER NOT NULL DEFAULT 0;
        """,
    ),
]


@dataclass(frozen=True)
class HistoryEntry(LedgerEntry):
    """A row as `billing-responder history` shows it: the entry, when its reply was sent (or
    drafted) and whether it was left as a draft."""

    sent_at: str | None = None
    reply_drafted: bool = False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


P = ParamSpec("P")
R = TypeVar("R")


def _serialised(method: Callable[Concatenate[SqliteLedger, P], R]) -> Callable[
    Concatenate[SqliteLedger, P], R
]:
    """One worker at a time on the connection: SQLite's own locking is between connections, and
    a transaction begun by one thread must not take in another's statements."""

    @functools.wraps(method)
    def locked(self: SqliteLedger, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class SqliteLedger:
    """The ledger in one SQLite file (WAL), or read-only for a dry run."""

    def __init__(self, path: Path, *, read_only: bool = False, clock: Callable[[], str] = _now):
        self.path = path
        self.read_only = read_only
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self._db = self._connect()
            if not read_only or self._in_memory:
                self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"{path}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        self._in_memory = False
        if self.read_only:
            if not self.path.exists():
                # A dry run before the first real run: nothing handled yet, and nothing to write.
                self._in_memory = True
                db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            else:
                writer_active = self.path.with_name(self.path.name + "-wal").exists()
                mode = "ro" if writer_active else "ro&immutable=1"
                db = sqlite3.connect(
                    f"file:{self.path}?mode={mode}", uri=True, check_same_thread=False,
                    isolation_level=None,
                )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                # The ledger holds customers' addresses: readable by the service user only, from
                # its first byte (a chmod after SQLite created it would leave a moment to open it
                # and keep reading). SQLite gives its -wal and -shm files the same mode.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
                os.chmod(self.path, 0o600)  # exactly, whatever the umask
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=5000")
        return db

    # -- migrations -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        applied = {r[0] for r in self._db.execute("SELECT name FROM schema_migrations")}
        for name, sql in _MIGRATIONS:
            if name in applied:
                continue
            with self._transaction():
                for statement in _statements(sql):
                    self._db.execute(statement)
                self._db.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?)", (name, self._clock())
                )

    @_serialised
    def migrations(self) -> list[tuple[str, str | None]]:
        """Every known migration with when it was applied (None = pending)."""
        applied = dict(self._db.execute("SELECT name, applied_at FROM schema_migrations"))
        return [(name, applied.get(name)) for name, _ in _MIGRATIONS]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            # A locked or full disk is no one message's fault: the run must stop, loudly.
            raise StateError(f"{self.path}: {exc}") from None

    # -- reading ----------------------------------------------------------------------------------

    @_serialised
    def get(self, gmail_id: str) -> LedgerEntry | None:
        """The row of a message, or None if it was never decided."""
        row = self._db.execute("SELECT * FROM messages WHERE gmail_id = ?", (gmail_id,)).fetchone()
        return None if row is None else _entry(row)

    @_serialised
    def unfinished(self) -> list[LedgerEntry]:
        """Replies begun but not completed (sending or sent), oldest first."""
        rows = self._db.execute(
            "SELECT * FROM messages WHERE state IN (?, ?) ORDER BY created_at, rowid",
            (SENDING, SENT),
        )
        return [_entry(r) for r in rows]

    @_serialised
    def entries(self, limit: int = 50) -> list[LedgerEntry]:
        """The most recently updated rows, newest first."""
        rows = self._db.execute(
            "SELECT * FROM messages ORDER BY updated_at DESC, rowid DESC LIMIT ?", (limit,)
        )
        return [_entry(r) for r in rows]

    @_serialised
    def history(
        self, *, since: datetime | None = None, action: str | None = None, limit: int = 100
    ) -> list[HistoryEntry]:
        """The audit log: rows updated at or after ``since`` with ``action``, newest first.

        Timestamps are stored as UTC ISO strings of one shape, so comparing strings compares
        times, and the ``messages_updated_at`` index serves both the filter and the order.
        """
        where, values = [], []
        if since is not None:
            where.append("updated_at >= ?")
            values.append(since.astimezone(UTC).isoformat(timespec="seconds"))
        if action is not None:
            where.append("action = ?")
            values.append(action)
        condition = f"WHERE {' AND '.join(where)} " if where else ""
        try:
            rows = self._db.execute(
                f"SELECT * FROM messages {condition}"  # noqa: S608 - fixed conditions, values bound
                "ORDER BY updated_at DESC, rowid DESC LIMIT ?",
                (*values, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from None
        return [_history_entry(r) for r in rows]

    # -- the mailbox as a whole -------------------------------------------------------------------

    @_serialised
    def history_id(self) -> int | None:
        """The Gmail history id the last complete cycle reached; None when a full sync is due."""
        try:
            row = self._db.execute(
                "SELECT value FROM mailbox_state WHERE key = 'history_id'"
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if self.read_only:  # a file from before 0002, read by a dry run: nothing stored
                return None
            raise StateError(f"{self.path}: {exc}") from None
        return None if row is None else int(row[0])

    @_serialised
    def record_history_id(self, history_id: int | None) -> None:
        """Store where the next cycle's history starts; None forgets it, so a full sync is next.

        Refused on a read-only ledger: a dry run never moves the real daemon's position.
        """
        if self.read_only:
            raise StateError(f"{self.path}: opened read-only; the history id is not stored")
        with self._transaction():
            if history_id is None:
                self._db.execute("DELETE FROM mailbox_state WHERE key = 'history_id'")
            else:
                self._db.execute(
                    "INSERT INTO mailbox_state (key, value, updated_at)"
                    " VALUES ('history_id', ?, ?) ON CONFLICT (key) DO UPDATE SET"
                    " value = excluded.value, updated_at = excluded.updated_at",
                    (str(history_id), self._clock()),
                )

    # -- writing ----------------------------------------------------------------------------------

    @_serialised
    def record_final(self, gmail_id: str, thread_id: str, decision: Decision,
                     customer_id: str | None = None) -> None:
        """A skip or escalation that is complete: nothing more will be done for this message."""
        self._upsert(gmail_id, thread_id, decision, DONE, customer_id=customer_id)

    @_serialised
    def record_intent(self, gmail_id: str, thread_id: str, decision: Decision, *,
                      customer_id: str, reply_message_id: str) -> None:
        """Before minting and sending: which reply (by its own Message-ID) is about to go out."""
        self._upsert(gmail_id, thread_id, decision, SENDING, customer_id=customer_id,
                     portal_session_id=None, reply_message_id=reply_message_id)

    @_serialised
    def record_session(self, gmail_id: str, portal_session_id: str) -> None:
        """The portal session minted for the intended reply (its id; never its URL)."""
        self._update(gmail_id, portal_session_id=portal_session_id)

    @_serialised
    def record_sent(self, gmail_id: str, sent_gmail_id: str, *, drafted: bool = False) -> None:
        """Gmail accepted the reply: sent, or (``drafted``) left as a draft in the thread."""
        self._update(
            gmail_id, state=SENT, sent_gmail_id=sent_gmail_id, sent_at=self._clock(),
            reply_drafted=int(drafted), last_error=None,
        )

    @_serialised
    def record_done(self, gmail_id: str) -> None:
        """The thread is labelled: the message is completely handled."""
        self._update(gmail_id, state=DONE, last_error=None)

    # -- replies already sent, or possibly sent (for limits.py) ------------------------------------

    @_serialised
    def last_reply_to(self, sender: str) -> datetime | None:
        """When a reply last went to ``sender`` (case-insensitive), if ever."""
        row = self._db.execute(
            "SELECT MAX(sent_at) FROM messages"
            " WHERE sent_at IS NOT NULL AND lower(sender) = lower(?)",
            (sender,),
        ).fetchone()
        return datetime.fromisoformat(row[0]) if row and row[0] else None

    @_serialised
    def replied_in_thread(self, thread_id: str) -> bool:
        """Whether a reply was ever sent in this thread."""
        row = self._db.execute(
            "SELECT 1 FROM messages WHERE thread_id = ? AND sent_at IS NOT NULL LIMIT 1",
            (thread_id,),
        ).fetchone()
        return row is not None

    @_serialised
    def replies_since(self, since: datetime) -> int:
        """How many replies were sent since ``since``, counting those in doubt (``sending``)."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM messages WHERE sent_at >= :since"
            " OR (state = :sending AND updated_at >= :since)",
            {"since": since.astimezone(UTC).isoformat(timespec="seconds"), "sending": SENDING},
        ).fetchone()
        return int(row[0])

    @_serialised
    def reply_in_doubt(self, sender: str, thread_id: str, other_than: str) -> bool:
        """Whether another message's reply to this sender or thread may have gone out unseen.

        A send whose answer was lost leaves its row ``sending`` until a later cycle finds the
        reply (or not); until then the limits cannot know whether this sender was answered.
        """
        row = self._db.execute(
            "SELECT 1 FROM messages WHERE state = ? AND gmail_id != ?"
            " AND (thread_id = ? OR lower(sender) = lower(?)) LIMIT 1",
            (SENDING, other_than, thread_id, sender),
        ).fetchone()
        return row is not None

    @_serialised
    def record_failure(self, gmail_id: str, thread_id: str, error: str) -> int:
        """A transient failure: the message stays for the next cycle; returns its failure count."""
        now = self._clock()
        with self._transaction():
            self._db.execute(
                "INSERT INTO messages (gmail_id, thread_id, action, reasons, state, failures,"
                " last_error, created_at, updated_at) VALUES (?, ?, 'deferred', '[]', 'pending',"
                " 1, ?, ?, ?) ON CONFLICT (gmail_id) DO UPDATE SET failures = failures + 1,"
                " last_error = excluded.last_error, updated_at = excluded.updated_at",
                (gmail_id, thread_id, error, now, now),
            )
        row = self._db.execute(
            "SELECT failures FROM messages WHERE gmail_id = ?", (gmail_id,)
        ).fetchone()
        return int(row[0])

    def _upsert(self, gmail_id: str, thread_id: str, decision: Decision, state: str,
                **extra: str | None) -> None:
        now = self._clock()
        values = {
            "gmail_id": gmail_id,
            "thread_id": thread_id,
            "sender": decision.sender,
            "subject": decision.subject,
            "action": decision.action.value,
            "reasons": json.dumps(list(decision.reasons)),
            "state": state,
            "created_at": now,
            "updated_at": now,
            **extra,
        }
        columns = ", ".join(values)
        placeholders = ", ".join(f":{c}" for c in values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c != "created_at")
        with self._transaction():
            self._db.execute(
                f"INSERT INTO messages ({columns}) VALUES ({placeholders}) "  # noqa: S608 - fixed column names
                f"ON CONFLICT (gmail_id) DO UPDATE SET {updates}",
                values,
            )

    def _update(self, gmail_id: str, **values: str | int | None) -> None:
        values["updated_at"] = self._clock()
        assignments = ", ".join(f"{c} = :{c}" for c in values)
        with self._transaction():
            self._db.execute(
                f"UPDATE messages SET {assignments} WHERE gmail_id = :gmail_id",  # noqa: S608
                {**values, "gmail_id": gmail_id},
            )

    @_serialised
    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _statements(script: str) -> list[str]:
    # executescript() would commit our open transaction; run statements one by one inside it.
    return [s.strip() for s in script.split(";") if s.strip()]


def _history_entry(row: sqlite3.Row) -> HistoryEntry:
    # A file from before migration 0003, read without migrating, has no sent_at column. (`in`
    # on a Row looks at its values, not its column names.)
    columns = row.keys()
    sent_at = row["sent_at"] if "sent_at" in columns else None
    drafted = bool(row["reply_drafted"]) if "reply_drafted" in columns else False
    return HistoryEntry(**vars(_entry(row)), sent_at=sent_at, reply_drafted=drafted)


def _entry(row: sqlite3.Row) -> LedgerEntry:
    return LedgerEntry(
        gmail_id=row["gmail_id"],
        thread_id=row["thread_id"],
        sender=row["sender"],
        subject=row["subject"] or "",
        action=row["action"],
        reasons=tuple(json.loads(row["reasons"])),
        state=row["state"],
        customer_id=row["customer_id"],
        portal_session_id=row["portal_session_id"],
        reply_message_id=row["reply_message_id"],
        sent_gmail_id=row["sent_gmail_id"],
        failures=row["failures"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
