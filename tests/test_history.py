"""`billing-responder history` (issue 5): the audit log, read from the ledger `once` wrote.

Through the sandbox: `once` answers, escalates and skips the demo inbox for real, then `history`
reads the ledger it left. The table's pure parts (fitting, terminal safety, `--since`) are also
checked on their own.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest

from billing_responder import history
from billing_responder.errors import StateError, UsageError
from billing_responder.history import (
    display_width,
    format_table,
    parse_since,
    table_row,
)
from billing_responder.ledger import HistoryEntry
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import Seeded, person_mail, seed
from tests.conftest import Sandbox, as_nobody, needs_root, private_ledger_config
from tests.test_draft_mode import draft_mode

SEND = r"/messages/send$"
HEADINGS = ("WHEN (UTC)", "SENDER", "SUBJECT", "DECISION", "REPLY SENT", "CUSTOMER", "REASONS")
JSON_FIELDS = {
    "when", "gmail_id", "thread_id", "sender", "subject", "action", "state", "decision",
    "reasons", "reply_sent", "reply_drafted", "customer_id", "portal_session_id", "reply_message_id",
    "sent_gmail_id", "sent_at", "failures", "last_error", "created_at", "updated_at",
}


@pytest.fixture
def handled(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> list[Seeded]:
    """The demo inbox after one real `once`: four replies, one escalation, three skips."""
    monkeypatch.setenv("COLUMNS", "250")  # wide enough that nothing is cut, unless a test says
    # One worker: the rows are then written in arrival order, which the ordering tests rely on.
    sandbox.set_config("[concurrency]\nworkers = 1")
    seeded = [s for s in seed(sandbox.gmail, sandbox.stripe) if s.expected != "untouched"]
    assert sandbox.cli("once").code == 0
    return seeded


def table_lines(stdout: str) -> list[str]:
    """The table's lines, heading first, without a footer."""
    return [line for line in stdout.splitlines() if line and not line.startswith("(")]


def json_lines(stdout: str) -> list[dict[str, object]]:
    """Each printed line as a JSON object."""
    return [json.loads(line) for line in stdout.splitlines()]


def backdate(sandbox: Sandbox, gmail_id: str, hours: float) -> None:
    """Move a ledger row ``hours`` into the past, as if it had been handled then."""
    stamp = (datetime.now(UTC) - timedelta(hours=hours)).isoformat(timespec="seconds")
    with sqlite3.connect(sandbox.folder / "state.db") as db:
        db.execute(
            "UPDATE messages SET created_at = ?, updated_at = ? WHERE gmail_id = ?",
            (stamp, stamp, gmail_id),
        )
    db.close()


def cells(row: str) -> list[str]:
    """A table line's cells (they are two or more spaces apart; none is empty)."""
    return re.split(r"\s{2,}", row.strip())


def row_of(lines: list[str], text: str) -> str:
    """The one table line containing ``text``."""
    found = [line for line in lines if text in line]
    assert len(found) == 1, (text, lines)
    return found[0]


class TestTable:
    def test_every_handled_message_is_a_row_newest_first(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """One row per decided message under the headings, the last handled at the top."""
        result = sandbox.cli("history")
        assert result.code == 0, result.stderr
        lines = table_lines(result.stdout)
        assert lines[0].split("  ")[0] == "WHEN (UTC)"
        assert all(heading in lines[0] for heading in HEADINGS)
        subjects = [s.subject for s in reversed(handled)]  # handled oldest first
        assert [next(s for s in subjects if s in line) for line in lines[1:]] == subjects

    def test_senders_are_masked_by_default(self, sandbox: Sandbox, handled: list[Seeded]) -> None:
        """No sender address appears in full; each shows as its masked form."""
        result = sandbox.cli("history")
        for message in handled:
            assert message.sender not in result.stdout
        assert "a***@example.com" in result.stdout and "s***@unknown.test" in result.stdout

    def test_full_shows_the_addresses(self, sandbox: Sandbox, handled: list[Seeded]) -> None:
        """--full shows every sender as written."""
        result = sandbox.cli("history", "--full")
        for message in handled:
            assert message.sender in result.stdout

    def test_each_row_says_decision_reply_and_customer(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """Replies: `reply`, sent, the customer the portal session was minted for; others: no."""
        lines = table_lines(sandbox.cli("history", "--full").stdout)
        customers = {session.customer for session in sandbox.stripe.portal_sessions()}
        for message in handled:
            decision, sent, customer = cells(row_of(lines, message.subject))[3:6]
            assert decision == message.expected
            if message.expected == "reply":
                assert sent == "yes" and customer in customers
            else:
                assert sent == "no" and customer == "-"

    def test_reasons_say_why_the_deciding_one_first(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """An escalation's row leads with why it was not answered."""
        lines = table_lines(sandbox.cli("history").stdout)
        row = row_of(lines, "Billing problem")
        assert cells(row)[-1].startswith("no Stripe customer has this sender's address")

    def test_the_table_fits_the_terminal(
        self, sandbox: Sandbox, handled: list[Seeded], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """At 100 columns no line is wider; subjects and reasons are cut with an ellipsis."""
        monkeypatch.setenv("COLUMNS", "100")
        result = sandbox.cli("history", "--full")
        lines = table_lines(result.stdout)
        assert max(display_width(line) for line in lines) <= 100
        assert any(line.endswith("…") for line in lines)

    def test_no_escape_codes_when_not_a_terminal(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """Piped or captured output is plain text."""
        assert "\x1b" not in sandbox.cli("history").stdout

    def test_limit_keeps_the_newest_and_says_so(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """--limit 2: the two newest rows and a line saying more exist."""
        result = sandbox.cli("history", "--limit", "2")
        lines = table_lines(result.stdout)
        assert len(lines) == 3 and handled[-1].subject in lines[1]
        assert "--limit" in result.stdout.splitlines()[-1]


class TestFilters:
    def test_decision_escalate_lists_only_escalations(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """--decision escalate: the escalated message only."""
        lines = table_lines(sandbox.cli("history", "--decision", "escalate", "--full").stdout)
        escalated = [m for m in handled if m.expected == "escalate"]
        assert len(lines) == 1 + len(escalated)
        assert escalated[0].sender in lines[1]

    def test_since_an_age_leaves_out_older_rows(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """A row handled three hours ago is outside --since 1h and inside --since 4h."""
        old = handled[0]
        backdate(sandbox, old.gmail_id, hours=3)
        recent = table_lines(sandbox.cli("history", "--since", "1h").stdout)
        assert len(recent) == len(handled) and all(old.subject not in line for line in recent)
        wider = table_lines(sandbox.cli("history", "--since", "4h").stdout)
        assert len(wider) == 1 + len(handled) and old.subject in wider[-1]

    def test_since_an_iso_time_with_offset(self, sandbox: Sandbox, handled: list[Seeded]) -> None:
        """--since with an ISO time and offset means that instant."""
        old = handled[0]
        backdate(sandbox, old.gmail_id, hours=3)
        two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).astimezone(
            timezone(timedelta(hours=2))
        )
        result = sandbox.cli("history", "--json", "--since", two_hours_ago.isoformat())
        ids = [entry["gmail_id"] for entry in json_lines(result.stdout)]
        assert old.gmail_id not in ids and len(ids) == len(handled) - 1

    def test_nothing_matching_says_so(self, sandbox: Sandbox, handled: list[Seeded]) -> None:
        """A filter nothing matches prints one line saying so, exit 0."""
        result = sandbox.cli("history", "--since", "2999-01-01")
        assert result.code == 0
        assert result.stdout.startswith("no history entries (since 2999-01-01 00:00 UTC)")

    @pytest.mark.parametrize("since", ["yesterday", "5x", "2 hours", "2024-13-01", "99999999w"])
    def test_a_bad_since_exits_2_naming_the_accepted_forms(
        self, sandbox: Sandbox, handled: list[Seeded], since: str
    ) -> None:
        """One line on stderr listing what --since accepts; exit 2, no traceback."""
        result = sandbox.cli("history", "--since", since)
        assert result.code == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1
        assert "30m, 2h, 3d or 1w" in result.stderr and "2024-05-01" in result.stderr

    def test_a_limit_below_one_exits_2(self, sandbox: Sandbox, handled: list[Seeded]) -> None:
        """--limit 0 is a usage error."""
        result = sandbox.cli("history", "--limit", "0")
        assert result.code == 2 and "--limit" in result.stderr


class TestJson:
    def test_one_object_per_line_with_every_field(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """--json: each line parses, carries every field, newest first, reasons complete."""
        entries = json_lines(sandbox.cli("history", "--json").stdout)
        assert [e["gmail_id"] for e in entries] == [m.gmail_id for m in reversed(handled)]
        assert all(set(e) == JSON_FIELDS for e in entries)
        escalated = next(e for e in entries if e["action"] == "escalate")
        reasons = escalated["reasons"]
        assert isinstance(reasons, list) and len(reasons) == 5
        assert reasons[-1] == "no Stripe customer has this sender's address"
        replied = [e for e in entries if e["action"] == "reply"]
        assert all(e["reply_sent"] is True and e["sent_gmail_id"] and e["sent_at"] for e in replied)
        assert all(str(e["portal_session_id"]).startswith("bps_") for e in replied)

    def test_json_masks_addresses_unless_full(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """Senders and the addresses inside reasons are masked; --full shows them."""
        masked = sandbox.cli("history", "--json").stdout
        full = sandbox.cli("history", "--json", "--full").stdout
        for message in handled:
            assert message.sender not in masked and message.sender in full
        ada = next(e for e in json_lines(masked) if e["subject"] == handled[0].subject)
        assert ada["sender"] == "a***@example.com"
        assert any("a***@example.com" in str(r) for r in ada["reasons"])  # type: ignore[attr-defined]


class TestInDoubt:
    def test_a_reply_whose_send_answer_was_lost_shows_in_doubt(self, sandbox: Sandbox) -> None:
        """Gmail took the reply but the answer was lost: `reply (in doubt, 1 failure)`, sent unknown."""
        sandbox.stripe.add_customer("ada@example.com", name="Ada")
        gmail_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(503, method="POST", path=SEND, after=True))
        assert sandbox.cli("once").code == 0
        lines = table_lines(sandbox.cli("history").stdout)
        row = row_of(lines, "Invoice")
        assert "reply (in doubt, 1 failure)" in row and "  in doubt  " in row
        assert cells(row)[-1].startswith("last error: ")
        entry = json_lines(sandbox.cli("history", "--json").stdout)[0]
        assert entry["gmail_id"] == gmail_id and entry["reply_sent"] is None
        assert entry["state"] == "sending" and entry["last_error"]


class TestPrivateLedger:
    @needs_root
    def test_a_ledger_in_a_folder_this_user_cannot_enter_is_one_clear_error(
        self, sandbox: Sandbox
    ) -> None:
        """As a user who cannot enter the ledger's folder (DynamicUser's /var/lib/private is 0700), `history` raises the StateError saying to run it as root or the service's user, no PermissionError traceback."""
        config = private_ledger_config(sandbox)
        with as_nobody(), pytest.raises(StateError, match="run `history` as root"):
            history.run_history(
                config, since=None, decision=None, as_json=False, full=False, limit=10,
                out=io.StringIO(),
            )


class TestDraftMode:
    def test_a_draft_shows_as_draft_not_as_sent(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After a draft-mode `once`, the row says `draft` under REPLY SENT; JSON has reply_sent false and reply_drafted true."""
        monkeypatch.setenv("COLUMNS", "250")
        draft_mode(sandbox)
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice for March", "?"))
        assert sandbox.cli("once").code == 0
        assert len(sandbox.gmail.drafts()) == 1 and sandbox.gmail.sent_messages() == []
        row = row_of(table_lines(sandbox.cli("history").stdout), "Invoice for March")
        assert cells(row)[3:5] == ["reply", "draft"]
        [record] = json_lines(sandbox.cli("history", "--json").stdout)
        assert record["reply_sent"] is False and record["reply_drafted"] is True
        assert record["sent_gmail_id"] == sandbox.gmail.drafts()[0].message.id

    def test_a_sent_reply_is_not_called_a_draft(self, sandbox: Sandbox) -> None:
        """In send mode the same message's row says `yes`, reply_drafted false."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice for March", "?"))
        assert sandbox.cli("once").code == 0
        [record] = json_lines(sandbox.cli("history", "--json").stdout)
        assert record["reply_sent"] is True and record["reply_drafted"] is False

    def test_a_ledger_from_before_drafts_reads_its_replies_as_sent(self, sandbox: Sandbox) -> None:
        """A ledger written before migration 0005 (no reply_drafted column) is read by `history` without migrating: its replies show as sent."""
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice for March", "?"))
        assert sandbox.cli("once").code == 0
        with sqlite3.connect(sandbox.folder / "state.db") as db:
            db.execute("ALTER TABLE messages DROP COLUMN reply_drafted")
            db.execute("DELETE FROM schema_migrations WHERE name = '0005_reply_drafted'")
        db.close()
        result = sandbox.cli("history", "--json")
        assert result.code == 0, result.stderr
        [record] = json_lines(result.stdout)
        assert record["reply_sent"] is True and record["reply_drafted"] is False
        with sqlite3.connect(sandbox.folder / "state.db") as db:
            columns = [row[1] for row in db.execute("PRAGMA table_info(messages)")]
        db.close()
        assert "reply_drafted" not in columns  # history read it, it did not migrate it


class TestReadOnly:
    def test_a_missing_ledger_is_no_history_yet_exit_0(self, sandbox: Sandbox) -> None:
        """Before the first run: one line naming the file, exit 0, and no file created."""
        for args in (("history",), ("history", "--json")):
            result = sandbox.cli(*args)
            assert result.code == 0 and result.stdout == ""
            path = sandbox.folder / "state.db"
            assert result.stderr == f"billing-responder: no history yet: {path} does not exist\n"
        assert sorted(p.name for p in sandbox.folder.iterdir()) == [
            "config.toml", "stripe.key", "token.json"
        ]

    def test_history_changes_no_byte_of_the_ledger(
        self, sandbox: Sandbox, handled: list[Seeded]
    ) -> None:
        """Reading the history leaves the folder's files and the database exactly as they were."""
        before = {p.name: p.read_bytes() for p in sandbox.folder.iterdir()}
        for args in (("history",), ("history", "--json", "--full"), ("history", "--since", "1d")):
            assert sandbox.cli(*args).code == 0
        assert {p.name: p.read_bytes() for p in sandbox.folder.iterdir()} == before

    def test_no_portal_url_in_any_output(self, sandbox: Sandbox, handled: list[Seeded]) -> None:
        """The portal links minted for the replies appear in no form of the history."""
        urls = [session.url for session in sandbox.stripe.portal_sessions()]
        assert len(urls) == 4
        for args in (("history",), ("history", "--full"), ("history", "--json", "--full")):
            result = sandbox.cli(*args)
            for url in urls:
                assert url not in result.stdout and url not in result.stderr
            assert "/p/session/" not in result.stdout


# -- the pure parts --------------------------------------------------------------------------------

NOW = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)


def entry(**changes: object) -> HistoryEntry:
    """A ledger entry for a skipped message, with ``changes``."""
    values: dict[str, object] = {
        "gmail_id": "m1", "thread_id": "t1", "sender": "jane.doe@example.com",
        "subject": "Invoice", "action": "skip", "reasons": ("automated: Precedence: bulk",),
        "state": "done", "customer_id": None, "portal_session_id": None,
        "reply_message_id": None, "sent_gmail_id": None, "failures": 0, "last_error": None,
        "created_at": "2024-05-10T11:00:00+00:00", "updated_at": "2024-05-10T11:00:00+00:00",
    }
    return HistoryEntry(**(values | changes))  # type: ignore[arg-type]


class TestSince:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("30m", datetime(2024, 5, 10, 11, 30, tzinfo=UTC)),
            ("2h", datetime(2024, 5, 10, 10, 0, tzinfo=UTC)),
            ("3d", datetime(2024, 5, 7, 12, 0, tzinfo=UTC)),
            ("1w", datetime(2024, 5, 3, 12, 0, tzinfo=UTC)),
            ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
            ("2024-05-01T14:30", datetime(2024, 5, 1, 14, 30, tzinfo=UTC)),
            ("2024-05-01 14:30:05Z", datetime(2024, 5, 1, 14, 30, 5, tzinfo=UTC)),
            ("2024-05-01T14:30+02:00", datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
        ],
    )
    def test_ages_and_iso_times_are_read(self, text: str, expected: datetime) -> None:
        """Ages count back from now; ISO times without an offset are UTC."""
        assert parse_since(text, NOW) == expected

    def test_anything_else_is_a_usage_error(self) -> None:
        """An unreadable value raises UsageError naming the accepted forms."""
        with pytest.raises(UsageError, match="30m, 2h, 3d or 1w"):
            parse_since("last tuesday", NOW)


class TestTerminalSafety:
    def test_control_and_bidi_characters_never_reach_the_terminal(self) -> None:
        """Escape sequences, bidi overrides and line breaks in a subject become harmless."""
        hostile = entry(subject="Invoice \x1b]0;owned\x07\x1b[2J\u202etxt.exe\nNext line")
        table = format_table([table_row(hostile, full=True)], 200)
        assert "\x1b" not in table and "\u202e" not in table and "\x07" not in table
        assert table.count("\n") == 2  # the heading and one row

    def test_wide_characters_are_measured_as_two_cells(self) -> None:
        """Rows with CJK subjects keep their columns aligned."""
        rows = [table_row(entry(subject="請求書について質問があります"), full=True),
                table_row(entry(subject="Invoice"), full=True)]
        lines = format_table(rows, 200).splitlines()
        starts = {display_width(line[: line.index("skip")]) for line in lines[1:]}
        assert len(starts) == 1

    def test_color_only_when_asked(self) -> None:
        """Colour codes appear with color=True (a terminal) and never otherwise."""
        rows = [table_row(entry(action="escalate"), full=False)]
        assert "\x1b[" in format_table(rows, 120, color=True)
        assert "\x1b" not in format_table(rows, 120, color=False)
