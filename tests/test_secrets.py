"""Secrets stay secret (issue 4): recognisable fake secrets through every command, then a search.

One module-scoped run drives `once --dry-run`, `once` and the daemon `run`, each a subprocess at
DEBUG (so stderr is the real one, as the journal gets it) with umask 0 (so modes come from the
code, not from a cautious umask), over a mailbox with mail to reply to, escalate and skip. The
Stripe key, the OAuth refresh token and client secret are recognisable strings; the access tokens
and portal URLs are taken from the emulators that issued them. The tests then look for all of
them in every output, every database row and file byte, and the token file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from billing_responder import ledger as ledger_module
from billing_responder.billing import key_mode
from billing_responder.ledger import SqliteLedger
from billing_responder.logs import MaskingFormatter, setup_logging
from billing_responder.sandbox.demo import write_sandbox_config
from billing_responder.sandbox.gmail import GmailEmulator
from billing_responder.sandbox.inbox import MAILBOX, person_mail, seed
from billing_responder.sandbox.stripe import StripeEmulator
from tests.conftest import Sandbox
from tests.test_cli import stop, wait_for

REPO = Path(__file__).resolve().parents[1]

STRIPE_KEY = "sk_test_SECRETSTRIPEKEY0123456789"
REFRESH_TOKEN = "1//SECRETREFRESHTOKEN0123456789"
CLIENT_SECRET = "GOCSPX-SECRETCLIENTSECRET0123"


class RecordingGmail(GmailEmulator):
    """The Gmail emulator, remembering every access token it ever issued."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.issued: list[str] = []

    def issue_access_token(self) -> str:
        token = super().issue_access_token()
        self.issued.append(token)
        return token


@dataclass(frozen=True)
class Run:
    """One command: its arguments, exit code and output."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str


@dataclass
class Trail:
    """Everything the three commands left behind, and the secrets to look for in it."""

    folder: Path
    runs: dict[str, Run] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # what it is -> the secret
    rows: list[tuple[str, str, object]] = field(default_factory=list)  # table, column, value
    file_bytes: dict[str, bytes] = field(default_factory=dict)  # database and -wal, as read
    modes: dict[str, int] = field(default_factory=dict)  # file name (when seen) -> mode
    token_inodes: dict[str, int] = field(default_factory=dict)  # after which step -> inode
    token_modes: dict[str, int] = field(default_factory=dict)
    token_after_once: str = ""
    session_ids: list[str] = field(default_factory=list)

    def outputs(self) -> dict[str, str]:
        """Every stdout and stderr, by command and stream."""
        found: dict[str, str] = {}
        for name, run in self.runs.items():
            found[f"{name} stdout"] = run.stdout
            found[f"{name} stderr"] = run.stderr
        return found


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "billing_responder", "--config", str(config),
            "--log-level", "DEBUG", *args]


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "STRIPE_API_KEY"}


def _run(config: Path, *args: str) -> Run:
    done = subprocess.run(
        _command(config, *args), cwd=REPO, env=_environment(), capture_output=True, text=True,
        timeout=120, check=False, umask=0,
    )
    return Run(args, done.returncode, done.stdout, done.stderr)


def _database_rows(path: Path) -> list[tuple[str, str, object]]:
    """Every value of every column of every table, found through sqlite_master."""
    rows: list[tuple[str, str, object]] = []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = db.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                rows.extend(
                    (table, column, value) for column, value in zip(columns, row, strict=True)
                )
    finally:
        db.close()
    return rows


def _observe_database(trail: Trail, when: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        path = trail.folder / f"state.db{suffix}"
        if path.exists():
            trail.modes[f"{path.name} ({when})"] = _mode(path)
            if suffix != "-shm":
                trail.file_bytes[f"{path.name} ({when})"] = path.read_bytes()


def _observe_token(trail: Trail, when: str) -> None:
    token_file = trail.folder / "token.json"
    trail.token_inodes[when] = token_file.stat().st_ino
    trail.token_modes[when] = _mode(token_file)


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    """`once --dry-run`, `once`, then `run` (with an access-token refresh forced), observed."""
    trail = Trail(tmp_path_factory.mktemp("secrets"))
    with (
        RecordingGmail(address=MAILBOX, refresh_token=REFRESH_TOKEN) as gmail,
        StripeEmulator(api_keys=(STRIPE_KEY,)) as stripe,
    ):
        seed(gmail, stripe)  # four to answer, one to escalate, three to skip, one not a candidate
        config = write_sandbox_config(trail.folder, gmail, stripe)
        with config.open("a", encoding="utf-8") as handle:
            handle.write("\n[schedule]\ninterval_seconds = 1\n")
        token_file = trail.folder / "token.json"
        token = json.loads(token_file.read_text(encoding="utf-8"))
        token_file.write_text(json.dumps(token | {"client_secret": CLIENT_SECRET}))
        token_file.chmod(0o644)  # as a person might leave it: the write-back must fix that
        (trail.folder / "stripe.key").write_text(STRIPE_KEY + "\n")
        _observe_token(trail, "start")

        trail.runs["once --dry-run"] = _run(config, "once", "--dry-run")
        trail.runs["once"] = _run(config, "once")
        _observe_token(trail, "once")
        _observe_database(trail, "after once")
        trail.token_after_once = json.loads(token_file.read_text(encoding="utf-8"))["token"]

        # New mail for the daemon, and every access token expired: its first call gets a 401,
        # the client refreshes, and the cycle writes the new token back.
        stripe.add_customer("lin.chen@example.org", name="Lin Chen")
        gmail.deliver(person_mail("lin.chen@example.org", "Invoice for May", "Where is it?"))
        gmail.deliver(person_mail("mallory@unknown.test", "Billing", "Refund me."))
        gmail.deliver(person_mail("news@tips.test", "Billing tips", "Read on.",
                                  extra_headers={"Precedence": "bulk"}))
        gmail.expire_access_tokens()
        process = subprocess.Popen(
            _command(config, "run"), cwd=REPO, env=_environment(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, umask=0,
        )
        try:
            written = wait_for(
                lambda: token_file.stat().st_ino != trail.token_inodes["once"], seconds=60
            )
            _observe_database(trail, "while run")
        finally:
            code, _, out, err = stop(process)
        trail.runs["run"] = Run(("run",), code, out, err)
        assert written, f"the daemon never wrote the refreshed token back:\n{err}"
        _observe_token(trail, "run")
        _observe_database(trail, "after run")
        trail.rows = _database_rows(trail.folder / "state.db")

        trail.secrets = {"Stripe key": STRIPE_KEY, "refresh token": REFRESH_TOKEN,
                         "client secret": CLIENT_SECRET}
        for number, issued in enumerate(gmail.issued):
            trail.secrets[f"access token {number}"] = issued
        for session in stripe.portal_sessions():
            trail.secrets[f"portal URL of {session.id}"] = session.url
            # The URL's secret part alone, in case something logs the path without the host.
            trail.secrets[f"portal path of {session.id}"] = session.url.rpartition("/")[2]
            trail.session_ids.append(session.id)
        assert len(gmail.sent_messages()) == 5, err
    for name, run in trail.runs.items():
        assert run.code == 0, f"{name} exited {run.code}:\n{run.stderr}"
    yield trail


def _leaks(trail: Trail, where: Mapping[str, str]) -> list[str]:
    """Which secret turns up where."""
    return [f"{what} in {place}" for place, text in where.items()
            for what, secret in trail.secrets.items() if secret in text]


class TestNothingSecretIsWritten:
    def test_the_run_covered_replies_escalations_skips_and_a_token_refresh(
        self, trail: Trail
    ) -> None:
        """The scenario is what the other tests assume: every outcome, minted links, refreshes."""
        once = trail.runs["once"].stdout
        assert "4 replied, 3 skipped, 1 escalated" in once
        daemon_log = trail.runs["run"].stderr
        assert "replied to" in daemon_log and "escalated" in daemon_log
        assert "skipped" in daemon_log
        assert len(trail.session_ids) == 5
        access_tokens = [k for k in trail.secrets if k.startswith("access token")]
        assert len(access_tokens) >= 3  # one refresh per process at least

    def test_no_secret_appears_on_stdout_or_stderr_of_any_command(self, trail: Trail) -> None:
        """Keys, tokens, client secret and portal URLs are absent from every output, at DEBUG."""
        assert _leaks(trail, trail.outputs()) == []

    def test_no_secret_appears_in_any_database_row(self, trail: Trail) -> None:
        """No value in any column of any table (found via sqlite_master) holds a secret."""
        assert {table for table, _, _ in trail.rows} >= {"messages", "mailbox_state"}
        values = {f"{t}.{c}={v!r}": str(v) for t, c, v in trail.rows if v is not None}
        assert _leaks(trail, values) == []

    def test_no_secret_appears_in_the_database_or_wal_file_bytes(self, trail: Trail) -> None:
        """Not even in free pages or the write-ahead log, read while the daemon ran and after."""
        assert any("-wal" in name for name in trail.file_bytes)  # the daemon's WAL was seen
        # latin-1 maps byte to character one to one, so an ASCII secret is found wherever it is.
        files = {name: data.decode("latin-1") for name, data in trail.file_bytes.items()}
        assert _leaks(trail, files) == []

    def test_the_ledger_keeps_the_portal_session_id_not_its_url(self, trail: Trail) -> None:
        """Each minted session is recorded by its id, so what is not there is not there by luck."""
        recorded = {v for t, c, v in trail.rows if (t, c) == ("messages", "portal_session_id")}
        assert set(trail.session_ids) <= recorded

    def test_the_token_file_holds_each_secret_only_in_its_own_field(self, trail: Trail) -> None:
        """Refresh token, client secret and the newest access token once each; nothing else."""
        text = (trail.folder / "token.json").read_text(encoding="utf-8")
        token = json.loads(text)
        assert token["refresh_token"] == REFRESH_TOKEN
        assert token["client_secret"] == CLIENT_SECRET
        newest = token["token"]
        assert newest != trail.token_after_once  # the daemon's refresh was written back
        own = {REFRESH_TOKEN, CLIENT_SECRET, newest}
        for what, secret in trail.secrets.items():
            assert text.count(secret) == (1 if secret in own else 0), what


class TestFileModes:
    def test_the_refreshed_token_is_written_back_0600_by_rename(self, trail: Trail) -> None:
        """Each write-back is a new file renamed into place (new inode), mode 0600, no leftovers."""
        assert trail.token_modes["start"] == 0o644
        assert trail.token_modes["once"] == 0o600
        assert trail.token_modes["run"] == 0o600
        inodes = trail.token_inodes
        assert len({inodes["start"], inodes["once"], inodes["run"]}) == 3
        leftovers = [p.name for p in trail.folder.iterdir() if p.name.startswith(".token.json")]
        assert leftovers == []

    def test_the_database_and_its_wal_and_shm_files_are_0600(self, trail: Trail) -> None:
        """state.db and, while the daemon runs, state.db-wal and -shm: owner only, under umask 0."""
        assert "state.db-wal (while run)" in trail.modes
        assert "state.db-shm (while run)" in trail.modes
        assert {name: 0o600 for name in trail.modes} == trail.modes

    def test_a_new_database_is_0600_before_sqlite_first_opens_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No moment exists in which the ledger file is open to others, whatever the umask."""
        seen: list[int | None] = []
        connect = sqlite3.connect

        def watching(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
            path = Path(database)
            seen.append(_mode(path) if path.exists() else None)
            return connect(database, *args, **kwargs)

        monkeypatch.setattr(ledger_module.sqlite3, "connect", watching)
        old_umask = os.umask(0)
        try:
            SqliteLedger(tmp_path / "state.db").close()
        finally:
            os.umask(old_umask)
        assert seen == [0o600]


class TestWhatTheOwnerSees:
    def test_logs_mask_customer_addresses_even_at_debug(self, trail: Trail) -> None:
        """Every stderr masks addresses, URL-encoded ones in request lines included."""
        for name, run in trail.runs.items():
            for address in ("ada@example.com", "grace@example.net", "stranger@unknown.test"):
                assert address not in run.stderr, name
            assert re.findall(r"(?<!\*\*\*)%40", run.stderr) == [], name
        assert "a***@example.com" in trail.runs["once"].stderr
        assert "l***@example.org" in trail.runs["run"].stderr
        assert "a***%40example.com" in trail.runs["once"].stderr  # urllib3's DEBUG request line

    def test_the_dry_run_review_shows_addresses_in_full(self, trail: Trail) -> None:
        """The owner-facing review on stdout names senders and recipients as they are."""
        review = trail.runs["once --dry-run"].stdout
        assert "Reply to: ada@example.com" in review
        assert "From:     stranger@unknown.test" in review

    def test_the_start_up_line_names_the_key_mode_without_the_key(self, trail: Trail) -> None:
        """Each command logs "Stripe key mode: test" once at start, and never the key."""
        for name, run in trail.runs.items():
            assert run.stderr.count("Stripe key mode: test") == 1, name
            assert "SECRETSTRIPEKEY" not in run.stderr, name

    @pytest.mark.parametrize(
        ("key", "mode"),
        [("sk_test_abc", "test"), ("rk_test_abc", "test"), ("sk_live_abc", "live"),
         ("rk_live_abc", "live")],
    )
    def test_key_mode_tells_test_from_live_keys(self, key: str, mode: str) -> None:
        """Secret and restricted keys alike: the prefix decides test or live."""
        assert key_mode(key) == mode


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger's handlers and level back after a test that sets up logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class TestMasking:
    @pytest.mark.parametrize(
        ("line", "masked"),
        [
            ('"GET /v1/customers?email=ada%40example.com&limit=100 HTTP/1.1" 200',
             '"GET /v1/customers?email=a***%40example.com&limit=100 HTTP/1.1" 200'),
            ("GET /v1/customers/search?query=email%3A%22Ada.L%40Example.org%22&limit=100",
             "GET /v1/customers/search?query=email%3A%22A***%40Example.org%22&limit=100"),
            ("ada%2Bbilling%40example.com", "a***%40example.com"),
            ("replied to jane.doe@example.com (1234)", "replied to j***@example.com (1234)"),
        ],
    )
    def test_addresses_are_masked_written_out_or_url_encoded(self, line: str, masked: str) -> None:
        """The formatter masks "@" and "%40" addresses, keeping the text around them."""
        record = logging.LogRecord("x", logging.DEBUG, __file__, 1, line, None, None)
        assert MaskingFormatter("%(message)s").format(record) == masked

    def test_masking_applies_at_debug_level(
        self, restore_logging: None, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A DEBUG line is masked like an INFO line."""
        setup_logging("DEBUG")
        logging.getLogger("billing_responder.test").debug("looked up ada@example.com")
        err = capsys.readouterr().err
        assert "a***@example.com" in err and "ada@example.com" not in err

    def test_mask_addresses_false_shows_addresses_in_full_in_once_stderr(
        self, sandbox: Sandbox
    ) -> None:
        """With [logging] mask_addresses = false, `once` logs the customer's whole address."""
        sandbox.set_config("[logging]\nmask_addresses = false")
        sandbox.stripe.add_customer("ada.lovelace@example.com")
        sandbox.gmail.deliver(person_mail("ada.lovelace@example.com", "Invoice", "?"))
        result = sandbox.cli("once")
        assert result.code == 0, result.stderr
        assert "replied to ada.lovelace@example.com" in result.stderr
        assert "a***@example.com" not in result.stderr

    def test_masking_is_on_by_default_in_once_stderr(self, sandbox: Sandbox) -> None:
        """Without the key, `once` logs the customer's address masked."""
        sandbox.stripe.add_customer("ada.lovelace@example.com")
        sandbox.gmail.deliver(person_mail("ada.lovelace@example.com", "Invoice", "?"))
        result = sandbox.cli("once")
        assert result.code == 0, result.stderr
        assert "replied to a***@example.com" in result.stderr
        assert "ada.lovelace@example.com" not in result.stderr
