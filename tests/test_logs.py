"""Log shapes: plain lines, journald lines with priority prefixes, JSON lines; addresses masked."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from billing_responder.logs import priority
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import Sandbox

REPO = Path(__file__).resolve().parents[1]


def run_once(sandbox: Sandbox, *, journal: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """`once` in a subprocess whose stderr is a file; with ``journal``, $JOURNAL_STREAM names it."""
    stderr_path = sandbox.folder / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k not in ("STRIPE_API_KEY", "JOURNAL_STREAM")}
    with stderr_path.open("w") as stderr:
        if journal:
            status = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        done = subprocess.run(
            [sys.executable, "-m", "billing_responder", "--config", str(sandbox.config_path),
             *extra, "once"],
            cwd=REPO, env=env | ({} if journal else {"JOURNAL_STREAM": "0:0"}),
            stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120, check=False,
        )
    assert done.returncode == 0, stderr_path.read_text()
    return stderr_path.read_text().splitlines()


def deliver_one_reply_and_one_escalation(sandbox: Sandbox) -> None:
    """A known customer's billing mail (INFO lines) and an unknown sender's (an escalation)."""
    sandbox.stripe.add_customer("ada.lovelace@example.com", subscription_statuses=["active"])
    sandbox.gmail.deliver(person_mail("ada.lovelace@example.com", "Invoice?", "?"))
    sandbox.gmail.deliver(person_mail("grace.hopper@example.org", "Billing", "?"))


class TestJournal:
    def test_under_journald_lines_carry_priorities_and_no_timestamp(self, sandbox: Sandbox) -> None:
        """With stderr as $JOURNAL_STREAM, each line starts <N> (sd-daemon(3)), journald adds the time."""
        deliver_one_reply_and_one_escalation(sandbox)
        lines = run_once(sandbox, journal=True)
        assert lines
        assert all(line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>") for line in lines), lines
        assert any(line.startswith("<6>billing_responder.pipeline: replied to a***@example.com")
                   for line in lines), lines
        assert not any(line[3:7].isdigit() for line in lines), "no timestamp under journald"

    def test_another_journal_stream_is_not_mistaken_for_ours(self, sandbox: Sandbox) -> None:
        """Without $JOURNAL_STREAM naming our stderr, lines are timestamped and carry no prefix."""
        deliver_one_reply_and_one_escalation(sandbox)
        lines = run_once(sandbox, journal=False)
        assert lines and all(line[:4].isdigit() for line in lines), lines

    @pytest.mark.parametrize(
        ("level", "expected"),
        [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6),
         (logging.DEBUG, 7), (5, 7)],
    )
    def test_levels_map_to_syslog_priorities(self, level: int, expected: int) -> None:
        """CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG (and below) 7."""
        assert priority(level) == expected


class TestJson:
    def test_json_lines_with_addresses_masked(self, sandbox: Sandbox) -> None:
        """--log-format json: every stderr line is one JSON object; addresses stay masked."""
        deliver_one_reply_and_one_escalation(sandbox)
        lines = run_once(sandbox, journal=True, extra=("--log-format", "json"))
        events = [json.loads(line) for line in lines]
        assert all(set(e) >= {"time", "level", "logger", "message"} for e in events)
        replied = [e for e in events if e["message"].startswith("replied to ")]
        assert len(replied) == 1 and replied[0]["level"] == "INFO"
        assert "a***@example.com" in replied[0]["message"]
        assert "ada.lovelace" not in "\n".join(lines) and "grace.hopper" not in "\n".join(lines)

    def test_config_sets_json_and_the_option_wins(self, sandbox: Sandbox) -> None:
        """[logging] format = "json" gives JSON lines; --log-format text overrides it."""
        sandbox.set_config('[logging]\nformat = "json"\n')
        sandbox.gmail.deliver(person_mail("grace.hopper@example.org", "Billing", "?"))
        assert all(json.loads(line) for line in run_once(sandbox, journal=False))
        lines = run_once(sandbox, journal=False, extra=("--log-format", "text"))
        assert lines and not any(line.startswith("{") for line in lines)
