"""The command line as users and scripts rely on it: commands, options, output, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from billing_responder.cli import main
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import CORPUS, Sandbox

REPO = Path(__file__).resolve().parents[1]


def explain(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    code = main(["--config", str(REPO / "config.toml"), "explain", str(path), *extra])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


def with_subject(raw: bytes, subject: str) -> bytes:
    """The raw message with its Subject header replaced (or added), bytes otherwise unchanged."""
    head, sep, body = raw.partition(b"\n\n")
    lines = head.split(b"\n")
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:8].lower() == b"subject:":
            skipping = True
            continue
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        kept.append(line)
    kept.append(b"Subject: " + subject.encode())
    return b"\n".join(kept) + sep + body


class TestExplain:
    def test_every_real_automated_message_is_skipped_even_about_an_invoice(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`explain` says skip for all of ../shared/corpus/automated, as-is and retitled 'Invoice'."""
        files = sorted((CORPUS / "automated").glob("*.eml"))
        assert len(files) >= 280, f"corpus missing or incomplete at {CORPUS}"
        wrong: list[str] = []
        for path in files:
            retitled = tmp_path / path.name
            retitled.write_bytes(with_subject(path.read_bytes(), "Invoice INV-2041 overdue"))
            for candidate in (path, retitled):
                result = explain(candidate, capsys)
                if result["action"] != "skip":
                    wrong.append(f"{candidate.name}: {result}")
        assert wrong == []

    def test_every_human_message_about_billing_gets_a_reply(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`explain` says reply for every human email in the corpus once its Subject mentions billing."""
        files = sorted((CORPUS / "human").glob("*.eml"))
        assert files, f"corpus missing at {CORPUS}"
        wrong: list[str] = []
        for path in files:
            retitled = tmp_path / path.name
            retitled.write_bytes(with_subject(path.read_bytes(), "Question about my billing"))
            result = explain(retitled, capsys, "--mailbox", "support@acme-saas.test")
            if result["action"] != "reply":
                wrong.append(f"{path.name}: {result}")
        assert wrong == []

    def test_output_is_json_with_action_and_reasons(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The printed JSON has exactly the keys action and reasons, reasons a list of strings."""
        path = tmp_path / "m.eml"
        path.write_bytes(person_mail("ada@example.com", "Lunch?", "Friday?"))
        result = explain(path, capsys)
        assert set(result) == {"action", "reasons"}
        assert result["action"] == "skip"
        reasons = result["reasons"]
        assert isinstance(reasons, list) and reasons and all(isinstance(r, str) for r in reasons)

    def test_missing_file_exits_2_with_one_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A file that cannot be read is a usage error: exit 2, one line, no traceback."""
        code = main(["--config", str(REPO / "config.toml"), "explain", "/nonexistent/x.eml"])
        err = capsys.readouterr().err
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and "/nonexistent/x.eml" in err

    def test_explain_needs_no_config_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Offline triage works in a folder with no config.toml, with the default keywords."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("BILLING_RESPONDER_CONFIG", raising=False)
        path = tmp_path / "m.eml"
        path.write_bytes(person_mail("ada@example.com", "Invoice?", "?"))
        assert main(["explain", str(path)]) == 0
        assert json.loads(capsys.readouterr().out)["action"] == "reply"


class TestUsage:
    def test_unknown_command_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A command that does not exist is a usage error, exit 2."""
        with pytest.raises(SystemExit) as caught:
            main(["frobnicate"])
        assert caught.value.code == 2

    def test_missing_config_exits_2_naming_the_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`once` with a config path that does not exist exits 2 and names the path."""
        code = main(["--config", str(tmp_path / "nope.toml"), "once"])
        err = capsys.readouterr().err
        assert code == 2 and "nope.toml" in err and "Traceback" not in err

    def test_missing_stripe_key_exits_2_saying_how_to_provide_it(self, sandbox: Sandbox) -> None:
        """Without STRIPE_API_KEY or a key file, `once` exits 2 and says how to give the key."""
        text = sandbox.config_path.read_text().replace('api_key_file = "stripe.key"\n', "")
        sandbox.config_path.write_text(text)
        result = sandbox.cli("once")
        assert result.code == 2
        assert "STRIPE_API_KEY" in result.stderr

    def test_module_entry_point_matches_the_command(self) -> None:
        """`python -m billing_responder --version` runs the same CLI."""
        done = subprocess.run(
            [sys.executable, "-m", "billing_responder", "--version"],
            capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
        )
        assert done.returncode == 0
        assert re.match(r"billing-responder \d+\.\d+\.\d+", done.stdout)


class TestDemo:
    def test_demo_prints_each_message_its_decision_and_the_replies_sent(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`demo` needs no credentials and tells, message by message, what it did and sent."""
        assert main(["demo"]) == 0
        out = capsys.readouterr().out
        assert out.count("REPLIED:") == 4
        assert out.count("SKIPPED:") == 3
        assert out.count("ESCALATED:") == 1
        assert "untouched" in out
        assert out.count("reply sent in the same thread:") == 4
        assert "Subject: Re: Where is my invoice for March?" in out
        assert re.search(r"Second cycle: 3 messages: 3 already handled", out)
        assert "Gmail received 4 replies; Stripe minted 4 portal sessions" in out


class TestDaemon:
    def test_run_answers_then_stops_cleanly_on_sigterm(self, sandbox: Sandbox) -> None:
        """`run` polls at once, replies, and on SIGTERM exits 0 well within 10 seconds."""
        sandbox.set_config("[schedule]\ninterval_seconds = 1")
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        env = {k: v for k, v in os.environ.items() if k != "STRIPE_API_KEY"}
        process = subprocess.Popen(
            [sys.executable, "-m", "billing_responder", "--config", str(sandbox.config_path),
             "run"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not sandbox.gmail.sent_messages() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(sandbox.gmail.sent_messages()) == 1
            # A second message arriving while it runs is answered by a later cycle.
            sandbox.gmail.deliver(person_mail("ada@example.com", "Another invoice", "?"))
            deadline = time.monotonic() + 30
            while len(sandbox.gmail.sent_messages()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(sandbox.gmail.sent_messages()) == 2
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=10)
            assert process.returncode == 0, stderr
            assert time.monotonic() - started < 10
            assert "SIGTERM received" in stderr
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
