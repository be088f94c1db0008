"""The command line as users and scripts rely on it: commands, options, output, exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from billing_responder.cli import main
from billing_responder.sandbox._http import Fault
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
    def test_no_real_automated_message_gets_a_link_even_about_an_invoice(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`explain` never says reply for ../shared/corpus/automated, as-is or retitled 'Invoice'.

        Each is skipped, except where only the missing sender authentication stands in the way
        (a bounce forwarded by hand carries no machine marker): that one goes to a person.
        """
        files = sorted((CORPUS / "automated").glob("*.eml"))
        assert len(files) >= 280, f"corpus missing or incomplete at {CORPUS}"
        wrong: list[str] = []
        for path in files:
            retitled = tmp_path / path.name
            retitled.write_bytes(with_subject(path.read_bytes(), "Invoice INV-2041 overdue"))
            for candidate in (path, retitled):
                result = explain(candidate, capsys)
                authentication = result["authentication"]
                assert isinstance(authentication, dict)
                unvouched = result["action"] == "escalate" and not authentication["authenticated"]
                if result["action"] != "skip" and not unvouched:
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
        """The printed JSON has the keys action, reasons (a list of strings) and authentication."""
        path = tmp_path / "m.eml"
        path.write_bytes(person_mail("ada@example.com", "Lunch?", "Friday?"))
        result = explain(path, capsys)
        assert set(result) == {"action", "reasons", "authentication"}
        assert result["action"] == "skip"
        reasons = result["reasons"]
        assert isinstance(reasons, list) and reasons and all(isinstance(r, str) for r in reasons)

    def test_authentication_reasoning_names_the_trusted_and_the_ignored_headers(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A forged dmarc=pass below Gmail's failing stamp is shown as ignored, and the verdict is Gmail's."""
        path = tmp_path / "forged.eml"
        path.write_bytes(
            b"Authentication-Results: mx.google.com; dmarc=fail (p=REJECT) header.from=customer.example\n"
            b"Authentication-Results: evil.test; dmarc=pass header.from=customer.example\n"
            b"From: CEO <ceo@customer.example>\n"
            b"Authentication-Results: mx.google.com; dmarc=pass header.from=customer.example\n"
            b"Subject: Invoice please\n\nhi\n"
        )
        result = explain(path, capsys)
        assert result["action"] == "escalate"
        assert result["authentication"] == {
            "sender": "ceo@customer.example",
            "authenticated": False,
            "verdict": "mx.google.com reports dmarc=fail for customer.example",
            "headers": [
                "trusted (the receiving server's own): mx.google.com; dmarc=fail (p=REJECT)"
                " header.from=customer.example",
                "ignored (below the trusted header, so anyone could write it): evil.test;"
                " dmarc=pass header.from=customer.example",
                "ignored (below the trusted header, so anyone could write it): mx.google.com;"
                " dmarc=pass header.from=customer.example",
            ],
        }

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
        assert re.search(r"Second cycle: 0 messages \(nothing changed since the first", out)
        assert "Gmail received 4 replies; Stripe minted 4 portal sessions" in out


def start_daemon(sandbox: Sandbox, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "STRIPE_API_KEY"}
    return subprocess.Popen(
        [sys.executable, "-m", "billing_responder", "--config", str(sandbox.config_path),
         "run", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(condition: Callable[[], object], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def stop(process: subprocess.Popen[str]) -> tuple[int, float, str, str]:
    """SIGTERM the process; its exit code, seconds taken, stdout and stderr."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, time.monotonic() - started, out, err


class TestDaemonStops:
    def test_sigterm_while_stripe_is_failing_slowly_exits_0_within_10_seconds(
        self, sandbox: Sandbox
    ) -> None:
        """Back-off and retries do not hold up a stop: exit 0 fast, the message left for later."""
        sandbox.stripe.add_customer("ada@example.com")
        message_id, _ = sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.stripe.inject_fault(Fault(503, path="/v1/billing_portal/sessions", times=1000,
                                          delay=0.5, headers={"Retry-After": "30"}))
        process = start_daemon(sandbox)
        try:
            assert wait_for(lambda: any(r.path == "/v1/billing_portal/sessions"
                                        for r in sandbox.stripe.requests))
        finally:
            code, seconds, _, err = stop(process)
        assert code == 0, err
        assert seconds < 10
        attempts = [r for r in sandbox.stripe.requests if r.path == "/v1/billing_portal/sessions"]
        assert len(attempts) == 1  # the call in flight ends; no further attempt after SIGTERM
        assert sandbox.gmail.sent_messages() == []
        assert "billing-responder/replied" not in sandbox.gmail.message_label_names(message_id)

    def test_sigterm_during_start_up_checks_exits_0(self, sandbox: Sandbox) -> None:
        """A stop requested while the start-up checks are retrying is a clean stop, exit 0."""
        sandbox.stripe.inject_fault(Fault(503, method="GET", path="^/v1/customers$", times=1000,
                                          delay=0.2))
        process = start_daemon(sandbox)
        try:
            assert wait_for(lambda: any(r.path == "/v1/customers"
                                        for r in sandbox.stripe.requests))
        finally:
            code, seconds, _, err = stop(process)
        assert code == 0, err
        assert seconds < 10

    def test_real_run_prints_nothing_on_stdout_and_masks_addresses_in_logs(
        self, sandbox: Sandbox
    ) -> None:
        """Under `run`, outcomes go to the log with addresses masked; stdout stays empty."""
        sandbox.stripe.add_customer("ada.lovelace@example.com")
        sandbox.gmail.deliver(person_mail("ada.lovelace@example.com", "Invoice", "?"))
        process = start_daemon(sandbox)
        try:
            assert wait_for(sandbox.gmail.sent_messages)
        finally:
            code, _, out, err = stop(process)
        assert code == 0
        assert out == ""
        assert "a***@example.com" in err
        assert "ada.lovelace@example.com" not in err

    def test_run_dry_run_writes_nothing_and_prints_the_review(self, sandbox: Sandbox) -> None:
        """`run --dry-run` reviews on stdout and makes no write request to either emulator."""
        sandbox.stripe.add_customer("ada@example.com", name="Ada")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        process = start_daemon(sandbox, "--dry-run")
        try:
            # The message in hand is finished after SIGTERM, so its review is printed in full.
            assert wait_for(lambda: any(r.path == "/v1/customers/search"
                                        for r in sandbox.stripe.requests))
        finally:
            code, _, out, err = stop(process)
        assert code == 0, err
        assert "WOULD REPLY" in out and "Reply to: ada@example.com" in out
        assert sandbox.gmail.writes() == [] and sandbox.stripe.writes() == []
        assert not (sandbox.folder / "state.db").exists()


    def test_run_survives_a_gmail_outage_and_answers_afterwards(self, sandbox: Sandbox) -> None:
        """A cycle that fails because Gmail is down is logged; the daemon lives on and answers later."""
        sandbox.set_config("[schedule]\ninterval_seconds = 1")
        sandbox.stripe.add_customer("ada@example.com")
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        sandbox.gmail.inject_fault(Fault(503, method="GET", path=r"/messages$", times=4))
        process = start_daemon(sandbox)
        try:
            assert wait_for(sandbox.gmail.sent_messages, seconds=40)
        finally:
            code, _, _, err = stop(process)
        assert code == 0, err
        assert "cycle failed, will retry" in err


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
            sandbox.stripe.add_customer("bob@example.org")
            sandbox.gmail.deliver(person_mail("bob@example.org", "Another invoice", "?"))
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
