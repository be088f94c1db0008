"""sd_notify: the datagrams systemd receives, read from a real AF_UNIX datagram socket."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing_responder import notify
from billing_responder.notify import SystemdNotifier


class Listener:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, name: str) -> None:
        #: The NOTIFY_SOCKET value that reaches this listener.
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name[1:] if name.startswith("@") else name)
        self.sock.settimeout(2)

    def next(self) -> bytes:
        """The next datagram (fails the test after 2 s without one)."""
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        """Every datagram already received, without waiting."""
        self.sock.setblocking(False)
        try:
            found = []
            while True:
                try:
                    found.append(self.sock.recv(4096))
                except BlockingIOError:
                    return found
        finally:
            self.sock.settimeout(2)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A listener bound to a socket file in tmp_path."""
    bound = Listener(str(tmp_path / "notify"))
    yield bound
    bound.sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    """A listener bound to a unique abstract socket name (``@...``)."""
    bound = Listener(f"@billing-responder-test/{uuid.uuid4()}")
    yield bound
    bound.sock.close()


class TestNotifications:
    def test_ready_sends_exactly_ready(self, listener: Listener) -> None:
        """ready() sends the single datagram `READY=1`."""
        SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.name}).ready()
        assert listener.next() == b"READY=1"
        assert listener.pending() == []

    def test_ready_with_status_sends_both_in_one_datagram(self, listener: Listener) -> None:
        """ready(status) sends `READY=1` and the status line together, as one datagram."""
        SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.name}).ready("polling")
        assert listener.next() == b"READY=1\nSTATUS=polling"

    def test_status_stopping_and_watchdog_send_their_assignments(self, listener: Listener) -> None:
        """status(), watchdog() and stopping() each send one datagram with their assignment."""
        notifier = SystemdNotifier.from_environment(
            {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "30000000"}
        )
        notifier.status("last cycle: 2 replied, 1 needs-human")
        notifier.watchdog()
        notifier.stopping()
        assert [listener.next() for _ in range(3)] == [
            b"STATUS=last cycle: 2 replied, 1 needs-human",
            b"WATCHDOG=1",
            b"STOPPING=1",
        ]

    def test_status_text_with_line_breaks_cannot_inject_an_assignment(
        self, listener: Listener
    ) -> None:
        """A status with newlines is sent on one line, so text like `READY=1` in it stays text."""
        SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.name}).status(
            "error: bad\nREADY=1\r\nMAINPID=1"
        )
        assert listener.next() == b"STATUS=error: bad READY=1 MAINPID=1"

    def test_status_is_sent_as_utf8(self, listener: Listener) -> None:
        """Non-ASCII status text arrives UTF-8 encoded."""
        SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.name}).status("größe ✓")
        assert listener.next() == "STATUS=größe ✓".encode()

    def test_abstract_socket_name_with_at_sign_is_reached(
        self, abstract_listener: Listener
    ) -> None:
        """NOTIFY_SOCKET=@name addresses the abstract socket `\\0name`."""
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": abstract_listener.name})
        notifier.ready()
        assert abstract_listener.next() == b"READY=1"

    def test_notifier_from_os_environ_by_default(
        self, listener: Listener, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without an explicit mapping the notifier reads os.environ."""
        monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
        SystemdNotifier.from_environment().stopping()
        assert listener.next() == b"STOPPING=1"


class TestWatchdog:
    def test_interval_is_half_of_watchdog_usec(self, listener: Listener) -> None:
        """WATCHDOG_USEC=30000000 (30 s) means a ping every 15 s."""
        notifier = SystemdNotifier.from_environment(
            {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "30000000"}
        )
        assert notifier.watchdog_interval_seconds == 15.0

    def test_watchdog_pid_of_this_process_enables_it(self, listener: Listener) -> None:
        """WATCHDOG_PID naming this process keeps the watchdog on."""
        notifier = SystemdNotifier.from_environment(
            {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "600000000",
             "WATCHDOG_PID": str(os.getpid())}
        )
        notifier.watchdog()
        assert notifier.watchdog_interval_seconds == 300.0
        assert listener.next() == b"WATCHDOG=1"

    def test_watchdog_pid_of_another_process_disables_it(self, listener: Listener) -> None:
        """WATCHDOG_PID naming another process (we inherited it) turns pings off entirely."""
        notifier = SystemdNotifier.from_environment(
            {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},
            pid=4242,
        )
        notifier.watchdog()
        assert notifier.watchdog_interval_seconds is None
        assert listener.pending() == []

    def test_no_watchdog_usec_means_no_interval_and_no_ping(self, listener: Listener) -> None:
        """Without WATCHDOG_USEC there is no interval and watchdog() sends nothing."""
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.name})
        notifier.watchdog()
        notifier.stopping()
        assert notifier.watchdog_interval_seconds is None
        assert listener.next() == b"STOPPING=1"  # the socket works; only the ping was dropped

    @pytest.mark.parametrize("usec", ["0", "-5", "1e6", " 30", "soon"])
    def test_invalid_watchdog_usec_disables_the_watchdog(
        self, listener: Listener, usec: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A WATCHDOG_USEC that is not a positive integer disables the watchdog, with a warning."""
        with caplog.at_level(logging.WARNING, logger=notify.__name__):
            notifier = SystemdNotifier.from_environment(
                {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": usec}
            )
        assert notifier.watchdog_interval_seconds is None
        assert "WATCHDOG_USEC" in caplog.text

    def test_constructor_ignores_a_non_positive_watchdog(self, listener: Listener) -> None:
        """SystemdNotifier(socket, watchdog_usec=0) has no interval, so no caller busy-loops on 0 s."""
        assert SystemdNotifier(listener.name, watchdog_usec=0).watchdog_interval_seconds is None

    def test_watchdog_without_notify_socket_has_no_interval(self) -> None:
        """WATCHDOG_USEC without NOTIFY_SOCKET gives no interval: there is nobody to ping."""
        notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": "30000000"})
        assert notifier.watchdog_interval_seconds is None


class TestWithoutSystemd:
    def test_unset_notify_socket_opens_no_socket(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without NOTIFY_SOCKET every method returns without creating a socket."""
        opened: list[object] = []
        monkeypatch.setattr(notify.socket, "socket", lambda *a, **k: opened.append(a))
        notifier = SystemdNotifier.from_environment({})
        notifier.ready("x")
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
        assert not notifier.enabled
        assert opened == []

    def test_unusable_notify_socket_value_disables_with_a_warning(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A NOTIFY_SOCKET that is neither a path nor @name (e.g. vsock:) disables notifying."""
        with caplog.at_level(logging.WARNING, logger=notify.__name__):
            notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
        assert not notifier.enabled
        assert notifier.notify("READY=1") is False
        assert "NOTIFY_SOCKET" in caplog.text

    def test_socket_that_is_gone_does_not_raise_and_warns_once(
        self, listener: Listener, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Sending to a socket that no longer exists raises nothing and logs one warning."""
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.name})
        listener.sock.close()
        Path(listener.name).unlink()
        with caplog.at_level(logging.WARNING, logger=notify.__name__):
            notifier.ready()
            notifier.status("still here")
            notifier.stopping()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert listener.name in warnings[0].getMessage()
        assert notifier.notify("READY=1") is False
