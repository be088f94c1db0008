"""Kill at every step: a `once` killed with SIGKILL anywhere on a message's way, then run again,
leaves exactly one reply, with a portal link Stripe minted once, and the message labelled. In
draft mode (``[reply] mode = "draft"``) the same holds for the draft: exactly one, labelled drafted.

Each kill point holds one request's answer back in an emulator (a :class:`Fault` with a
``delay``; with ``after=True`` the request is carried out first), waits for a signal that the
subprocess has reached the point (emulator state or its ledger row), SIGKILLs it there, clears
the faults and runs `once` again in-process. The held answer is the window the kill lands in;
each test checks that it did land there (the emulator had not answered yet), so a slow machine
fails loudly instead of testing a different point.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from billing_responder.ledger import DONE, SENDING, SENT, LedgerEntry, SqliteLedger
from billing_responder.sandbox._http import EmulatorServer, Fault
from billing_responder.sandbox.gmail import StoredMessage
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import Sandbox, text_of

REPO = Path(__file__).resolve().parents[1]
REPLIED = "billing-responder/replied"
DRAFTED = "billing-responder/drafted"
CUSTOMER = "ada@example.com"
#: How long an emulator holds the faulted answer back: the window in which the kill must land.
HOLD_SECONDS = 1.5
FAULT_STATUS = 500
SESSIONS = r"^/v1/billing_portal/sessions$"
SEND = r"/messages/send$"
DRAFTS_CREATE = r"/users/me/drafts$"
MODIFY = r"/messages/[^/]+/modify$"


def ledger_row(sandbox: Sandbox, gmail_id: str) -> sqlite3.Row | None:
    """The message's ledger row as the running subprocess left it (read-only; None if none yet)."""
    path = sandbox.folder / "state.db"
    if not path.exists():
        return None
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.row_factory = sqlite3.Row
            row: sqlite3.Row | None = db.execute(
                "SELECT * FROM messages WHERE gmail_id = ?", (gmail_id,)
            ).fetchone()
            return row
    except sqlite3.OperationalError:  # the subprocess has not created the table yet
        return None


@dataclass(frozen=True)
class KillPoint:
    """Where on the message's way the first run dies, and how the test knows it got there."""

    name: str
    service: str  # "gmail" or "stripe": the emulator that holds the answer back
    method: str
    path: str  # regular expression for the held request's path; "" for no fault at all
    after: bool  # the held request is carried out before its (lost) answer
    reached: Callable[[Sandbox, str], bool]
    mode: str = "send"  # [reply] mode: "draft" leaves the reply as a draft instead

    def fault(self) -> Fault | None:
        """A fresh fault (faults count down, so each run needs its own)."""
        if not self.path:
            return None
        return Fault(FAULT_STATUS, method=self.method, path=self.path, after=self.after,
                     delay=HOLD_SECONDS)

    def server(self, sandbox: Sandbox) -> EmulatorServer:
        """The emulator holding the answer back."""
        return sandbox.gmail if self.service == "gmail" else sandbox.stripe

    def answered(self, sandbox: Sandbox) -> bool:
        """Whether the held request was answered (an emulator logs a request once it answered)."""
        return any(
            r.method == self.method and re.search(self.path, r.path) and r.status == FAULT_STATUS
            for r in self.server(sandbox).requests
        )


def _state_is(state: str) -> Callable[[Sandbox, str], bool]:
    def reached(sandbox: Sandbox, gmail_id: str) -> bool:
        row = ledger_row(sandbox, gmail_id)
        return row is not None and row["state"] == state
    return reached


def _session_recorded(sandbox: Sandbox, gmail_id: str) -> bool:
    row = ledger_row(sandbox, gmail_id)
    return row is not None and row["portal_session_id"] is not None


KILL_POINTS = [
    KillPoint("at start, before anything", "", "", "", False, lambda s, g: True),
    KillPoint("intent recorded, before Stripe minted", "stripe", "POST", SESSIONS, False,
              _state_is(SENDING)),
    KillPoint("Stripe minted, before its answer", "stripe", "POST", SESSIONS, True,
              lambda s, g: bool(s.stripe.portal_sessions())),
    KillPoint("session recorded, before the send", "gmail", "POST", SEND, False,
              _session_recorded),
    KillPoint("Gmail stored the reply, before its answer", "gmail", "POST", SEND, True,
              lambda s, g: bool(s.gmail.sent_messages())),
    KillPoint("send recorded, before the label", "gmail", "POST", MODIFY, False,
              _state_is(SENT)),
    KillPoint("label applied, before the ledger said done", "gmail", "POST", MODIFY, True,
              lambda s, g: REPLIED in s.gmail.message_label_names(g)),
]
#: Draft mode differs from sending only from the send on: the same steps with drafts.create.
DRAFT_KILL_POINTS = [
    KillPoint("draft mode: session recorded, before drafts.create", "gmail", "POST",
              DRAFTS_CREATE, False, _session_recorded, "draft"),
    KillPoint("draft mode: Gmail made the draft, before its answer", "gmail", "POST",
              DRAFTS_CREATE, True, lambda s, g: bool(s.gmail.drafts()), "draft"),
    KillPoint("draft mode: draft recorded, before the label", "gmail", "POST", MODIFY, False,
              _state_is(SENT), "draft"),
    KillPoint("draft mode: label applied, before the ledger said done", "gmail", "POST", MODIFY,
              True, lambda s, g: DRAFTED in s.gmail.message_label_names(g), "draft"),
]


def wait_for(condition: Callable[[], object], seconds: float) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return bool(condition())


@contextmanager
def once_subprocess(sandbox: Sandbox) -> Iterator[subprocess.Popen[bytes]]:
    """`billing-responder once` in a subprocess, killed on the way out whatever happened."""
    env = {k: v for k, v in os.environ.items() if k != "STRIPE_API_KEY"}
    process = subprocess.Popen(
        [sys.executable, "-m", "billing_responder", "--config", str(sandbox.config_path), "once"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=15)


class LedgerNotDoneError(Exception):
    """The reply and label are right, but the message's ledger row did not end ``done``."""


def _params() -> list[object]:
    return [pytest.param(point, id=point.name) for point in KILL_POINTS + DRAFT_KILL_POINTS]


def replies(sandbox: Sandbox, mode: str) -> list[StoredMessage]:
    """The replies in the mailbox: sent ones, or in draft mode the drafts (and nothing sent)."""
    if mode == "send":
        return sandbox.gmail.sent_messages()
    assert sandbox.gmail.sent_messages() == []
    return [draft.message for draft in sandbox.gmail.drafts()]


class TestKillAtEveryStep:
    @pytest.mark.parametrize("point", _params())
    def test_killed_once_run_again_leaves_exactly_one_reply_labelled(
        self, sandbox: Sandbox, point: KillPoint
    ) -> None:
        """Killed here and run again: one reply, its link from the one minted session, labelled."""
        if point.mode == "draft":
            text = sandbox.config_path.read_text(encoding="utf-8")
            sandbox.config_path.write_text(text.replace("[reply]\n", '[reply]\nmode = "draft"\n'))
        label = DRAFTED if point.mode == "draft" else REPLIED
        customer = sandbox.stripe.add_customer(CUSTOMER, name="Ada")
        gmail_id, thread_id = sandbox.gmail.deliver(person_mail(CUSTOMER, "Invoice", "?"))
        fault = point.fault()
        if fault is not None:
            point.server(sandbox).inject_fault(fault)
        try:
            with once_subprocess(sandbox) as process:
                reached = wait_for(
                    lambda: point.reached(sandbox, gmail_id) or process.poll() is not None, 20
                )
                process.kill()
                _, stderr = process.communicate(timeout=15)
            assert reached and process.returncode == -signal.SIGKILL, stderr.decode()
            # The kill landed inside the window: the held answer never reached the process.
            assert fault is None or not point.answered(sandbox)
            assert len(sandbox.stripe.portal_sessions()) <= 1
            sandbox.gmail.clear_faults()
            sandbox.stripe.clear_faults()

            result = sandbox.cli("once")

            assert result.code == 0, result.stderr
            row = ledger_entry(sandbox, gmail_id)
            sent = replies(sandbox, point.mode)
            assert len(sent) == 1, f"{len(sent)} replies; ledger row: {row}"
            assert sent[0].thread_id == thread_id
            assert sent[0].message["To"] == CUSTOMER
            assert label in sandbox.gmail.message_label_names(gmail_id), row
            # One session overall: a resumed attempt replays its session under the same key.
            sessions = sandbox.stripe.portal_sessions()
            assert [s.customer for s in sessions] == [customer]
            assert sessions[0].url in text_of(sent[0].message)
            creates = [r for r in sandbox.stripe.requests if re.search(SESSIONS, r.path)]
            assert {r.headers["idempotency-key"] for r in creates} == {sessions[0].idempotency_key}
            if row is None or row.state != DONE:
                raise LedgerNotDoneError(f"ledger row: {row}")
        finally:
            # A held answer is still on its way to the dead process; let it be given in this
            # test, so its request log entry cannot land in a later test's emulator state.
            if fault is not None and fault.times == 0:
                wait_for(lambda: point.answered(sandbox), HOLD_SECONDS + 5)


def ledger_entry(sandbox: Sandbox, gmail_id: str) -> LedgerEntry | None:
    """The message's ledger row, read through the ledger itself once no run is going on."""
    ledger = SqliteLedger(sandbox.folder / "state.db")
    try:
        return ledger.get(gmail_id)
    finally:
        ledger.close()
