"""The SQLite ledger: durable states, named migrations, privacy of the file, dry-run reads."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from billing_responder.errors import StateError
from billing_responder.ledger import DONE, SENDING, SENT, SqliteLedger
from billing_responder.model import Action, Decision

REPLY = Decision(Action.REPLY, ("subject mentions 'invoice'",), "ada@example.com", "Invoice?")
SKIP = Decision(Action.SKIP, ("automated: Auto-Submitted: auto-replied",), "bot@example.com", "x")


class TestStates:
    def test_reply_moves_from_sending_to_sent_to_done(self, tmp_path: Path) -> None:
        """A reply's row records intent, the sent id, then completion, keeping the Message-ID."""
        ledger = SqliteLedger(tmp_path / "state.db")
        ledger.record_intent("m1", "t1", REPLY, customer_id="cus_1",
                             reply_message_id="<r1@acme.test>")
        assert ledger.get("m1").state == SENDING  # type: ignore[union-attr]
        ledger.record_session("m1", "bps_1")
        assert ledger.get("m1").portal_session_id == "bps_1"  # type: ignore[union-attr]
        ledger.record_sent("m1", "g-sent-1")
        assert ledger.get("m1").state == SENT  # type: ignore[union-attr]
        ledger.record_done("m1")
        entry = ledger.get("m1")
        assert entry is not None
        assert (entry.state, entry.sent_gmail_id, entry.reply_message_id) == (
            DONE, "g-sent-1", "<r1@acme.test>")

    def test_rows_survive_reopening(self, tmp_path: Path) -> None:
        """What one process recorded, the next process reads: 'handled' survives restarts."""
        SqliteLedger(tmp_path / "state.db").record_final("m2", "t2", SKIP)
        reopened = SqliteLedger(tmp_path / "state.db")
        entry = reopened.get("m2")
        assert entry is not None and entry.state == DONE
        assert entry.reasons == SKIP.reasons

    def test_failures_are_counted_without_losing_the_intent(self, tmp_path: Path) -> None:
        """A transient failure after the intent keeps the state and counts the failure."""
        ledger = SqliteLedger(tmp_path / "state.db")
        ledger.record_intent("m3", "t3", REPLY, customer_id="cus_1",
                             reply_message_id="<r3@acme.test>")
        ledger.record_failure("m3", "t3", "Gmail: HTTP 503")
        ledger.record_failure("m3", "t3", "Gmail: HTTP 503")
        entry = ledger.get("m3")
        assert entry is not None
        assert (entry.state, entry.failures, entry.last_error) == (SENDING, 2, "Gmail: HTTP 503")

    def test_no_portal_url_column_exists(self, tmp_path: Path) -> None:
        """The schema has no place for a portal URL: only the session id is kept."""
        SqliteLedger(tmp_path / "state.db").close()
        columns = [r[1] for r in sqlite3.connect(tmp_path / "state.db").execute(
            "PRAGMA table_info(messages)")]
        assert "portal_session_id" in columns
        assert not [c for c in columns if "url" in c]


class TestFile:
    def test_database_is_private_to_its_owner(self, tmp_path: Path) -> None:
        """The ledger file is created with mode 0600."""
        SqliteLedger(tmp_path / "state.db").close()
        assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600

    def test_migrations_are_named_and_recorded(self, tmp_path: Path) -> None:
        """Every migration is listed with the time it was applied."""
        applied = SqliteLedger(tmp_path / "state.db").migrations()
        assert applied and applied[0][0] == "0001_messages"
        assert all(when is not None for _, when in applied)

    def test_read_only_ledger_of_a_missing_file_creates_nothing(self, tmp_path: Path) -> None:
        """A dry run before any real run reads an empty ledger and leaves no file behind."""
        ledger = SqliteLedger(tmp_path / "state.db", read_only=True)
        assert ledger.get("m1") is None
        assert not (tmp_path / "state.db").exists()

    def test_read_only_ledger_sees_recorded_rows(self, tmp_path: Path) -> None:
        """A dry run after real runs knows what was already handled."""
        SqliteLedger(tmp_path / "state.db").record_final("m4", "t4", SKIP)
        entry = SqliteLedger(tmp_path / "state.db", read_only=True).get("m4")
        assert entry is not None and entry.state == DONE

    def test_read_only_ledger_of_an_existing_file_leaves_no_side_files(
        self, tmp_path: Path
    ) -> None:
        """A dry run against a real ledger creates no -wal/-shm files (owned by the wrong user)."""
        writer = SqliteLedger(tmp_path / "state.db")
        writer.record_final("m5", "t5", SKIP)
        writer.close()
        before = sorted(p.name for p in tmp_path.iterdir())
        reader = SqliteLedger(tmp_path / "state.db", read_only=True)
        assert reader.get("m5") is not None
        reader.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == before

    def test_unusable_path_is_a_state_error_not_a_traceback(self, tmp_path: Path) -> None:
        """A database path below a plain file raises StateError naming the path."""
        (tmp_path / "afile").write_text("x")
        with pytest.raises(StateError, match="afile"):
            SqliteLedger(tmp_path / "afile" / "state.db")
