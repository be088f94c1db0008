"""The daemon under systemd's eyes: what `run` sends to a real NOTIFY_SOCKET (AF_UNIX datagrams)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.inbox import person_mail
from tests.conftest import Sandbox

REPO = Path(__file__).resolve().parents[1]
WATCHDOG_USEC = 2_000_000  # pings every second


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; collects what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self.received: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> None:
        """Read datagrams for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    def collect_until(self, wanted: str, seconds: float = 30) -> bool:
        """Read until a datagram containing ``wanted`` arrives (True) or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(wanted in text for _, text in self.received):
                return True
            self.collect(0.2)
        return any(wanted in text for _, text in self.received)

    def texts(self) -> list[str]:
        """Every datagram so far, in order of arrival."""
        return [text for _, text in self.received]

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A bound AF_UNIX datagram socket in a short path (sun_path is limited to 108 bytes)."""
    folder = Path(f"/tmp/br-notify-{os.getpid()}-{time.monotonic_ns()}")
    folder.mkdir()
    listener = NotifySocket(folder / "notify")
    yield listener
    listener.close()
    (folder / "notify").unlink(missing_ok=True)
    folder.rmdir()


def start_daemon(sandbox: Sandbox, notify: NotifySocket) -> subprocess.Popen[str]:
    """`run` as systemd would start it: NOTIFY_SOCKET and WATCHDOG_USEC in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("STRIPE_API_KEY", "WATCHDOG_PID")}
    env |= {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    return subprocess.Popen(
        [sys.executable, "-m", "billing_responder", "--config", str(sandbox.config_path), "run"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def terminate(process: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM, then the exit code and stderr."""
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, err


class TestNotifications:
    def test_ready_status_watchdog_and_stopping_in_order(
        self, sandbox: Sandbox, notify_socket: NotifySocket
    ) -> None:
        """READY=1 first, STATUS with the cycle's counts, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""
        sandbox.set_config("[schedule]\ninterval_seconds = 1\n")
        sandbox.stripe.add_customer("ada@example.com", subscription_statuses=["active"])
        sandbox.gmail.deliver(person_mail("ada@example.com", "Invoice", "?"))
        process = start_daemon(sandbox, notify_socket)
        try:
            assert notify_socket.collect_until("1 answered since start"), notify_socket.texts()
            notify_socket.collect(3)
        finally:
            code, err = terminate(process)
        notify_socket.collect(0.5)
        texts = notify_socket.texts()
        assert code == 0, err
        assert texts[0].startswith("READY=1"), texts
        statuses = [t for t in texts if t.startswith("STATUS=")]
        assert any("1 message: 1 replied" in t for t in statuses), statuses
        assert texts.count("WATCHDOG=1") >= 2, texts
        assert texts[-1] == "STOPPING=1", texts
        assert len(sandbox.gmail.sent_messages()) == 1

    def test_watchdog_pings_go_on_between_cycles_longer_apart_than_watchdogsec(
        self, sandbox: Sandbox, notify_socket: NotifySocket
    ) -> None:
        """With a poll interval (6 s) longer than WatchdogSec (2 s), WATCHDOG=1 pings go on while the daemon waits for its next cycle."""
        sandbox.set_config("[schedule]\ninterval_seconds = 6\n")
        process = start_daemon(sandbox, notify_socket)
        try:
            assert notify_socket.collect_until("STATUS=last cycle"), notify_socket.texts()
            cycle_done = time.monotonic()
            notify_socket.collect(4.5)
        finally:
            terminate(process)
        pings = [at - cycle_done for at, text in notify_socket.received if text == "WATCHDOG=1"]
        # Past WatchdogSec since the last progress, still pinging: no restart while idle.
        assert [p for p in pings if p > 2.5], pings

    def test_watchdog_pings_stop_while_a_cycle_hangs(
        self, sandbox: Sandbox, notify_socket: NotifySocket
    ) -> None:
        """A Gmail call that hangs longer than WatchdogSec stops the WATCHDOG=1 pings (systemd restarts)."""
        sandbox.set_config("[schedule]\ninterval_seconds = 1\n")
        process = start_daemon(sandbox, notify_socket)
        try:
            assert notify_socket.collect_until("STATUS=last cycle"), notify_socket.texts()
            notify_socket.collect(2.5)
            sandbox.gmail.inject_fault(Fault(503, path="/history", delay=10, times=1))
            hung_from = time.monotonic()
            notify_socket.collect(9)
        finally:
            terminate(process)
        pings = [at - hung_from for at, text in notify_socket.received if text == "WATCHDOG=1"]
        assert [p for p in pings if p < 0], "pings while cycles succeed"
        # The next cycle (within 1 s) hangs; pings may go on until the poll interval plus
        # WatchdogSec (1 + 2 s) after the last progress, and then never while it hangs.
        assert not [p for p in pings if p > 5], pings


class TestStartUpOutage:
    def test_status_and_start_timeout_extension_while_waiting_out_an_outage_then_ready(
        self, sandbox: Sandbox, notify_socket: NotifySocket
    ) -> None:
        """While Stripe is down at start-up: a STATUS line naming it and the retry, EXTEND_TIMEOUT_USEC covering the wait, no READY=1 or WATCHDOG=1; READY=1 once it is back."""
        sandbox.stripe.inject_fault(Fault(503, method="GET", path=r"^/v1/customers$", times=2,
                                          headers={"Retry-After": "3600"}))  # no in-call retry
        process = start_daemon(sandbox, notify_socket)
        try:
            assert notify_socket.collect_until("READY=1"), notify_socket.texts()
        finally:
            code, err = terminate(process)
        assert code == 0, err
        texts = notify_socket.texts()
        before_ready = texts[: next(i for i, t in enumerate(texts) if t.startswith("READY=1"))]
        statuses = [t for t in before_ready if t.startswith("STATUS=")]
        assert len(statuses) == 2, texts
        assert statuses[0].startswith("STATUS=starting: Stripe: "), statuses
        assert "retrying in 1 s" in statuses[0] and "retrying in 2 s" in statuses[1], statuses
        # The back-off plus 5 minutes for the next attempt, past TimeoutStartSec=5min.
        extensions = [t for t in before_ready if t.startswith("EXTEND_TIMEOUT_USEC=")]
        assert extensions == ["EXTEND_TIMEOUT_USEC=301000000", "EXTEND_TIMEOUT_USEC=302000000"]
        assert "WATCHDOG=1" not in before_ready
