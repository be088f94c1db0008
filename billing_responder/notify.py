"""Tell systemd how the daemon is doing: the sd_notify(3) protocol in a few lines of stdlib.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or an abstract socket
name written with a leading ``@``) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``, see sd_watchdog_enabled(3)). Each notification is one datagram of
newline-separated ``KEY=value`` assignments. Without ``NOTIFY_SOCKET`` (a terminal, a test, a plain
unit) every method does nothing. A notification that cannot be sent is logged once as a warning and
otherwise ignored: telling systemd is never a reason for the daemon to fail.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends ``READY=1``, ``STATUS=``, ``WATCHDOG=1`` and ``STOPPING=1`` to systemd, if it listens.

    Thread-safe: every notification uses its own socket, so the scheduler thread may report
    status while a timer thread pings the watchdog.
    """

    def __init__(self, socket_name: str | None = None, *, watchdog_usec: int | None = None) -> None:
        """``socket_name`` as in ``NOTIFY_SOCKET``; ``watchdog_usec`` as in ``WATCHDOG_USEC``."""
        self._address = _socket_address(socket_name) if socket_name else None
        usable = self._address is not None and watchdog_usec is not None and watchdog_usec > 0
        self._watchdog_usec = watchdog_usec if usable else None
        self._warn_lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> SystemdNotifier:
        """The notifier systemd asked for in ``environ`` (default ``os.environ``).

        The watchdog is on when ``WATCHDOG_USEC`` is a positive integer and ``WATCHDOG_PID`` is
        unset or names this process (``pid``, default ``os.getpid()``), as sd_watchdog_enabled(3)
        decides: a child that inherited the variables must not ping for its parent.
        """
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET") or None,
            watchdog_usec=_watchdog_usec(env, os.getpid() if pid is None else pid),
        )

    @property
    def enabled(self) -> bool:
        """Whether systemd is listening (``NOTIFY_SOCKET`` was usable)."""
        return self._address is not None

    @property
    def watchdog_interval_seconds(self) -> float | None:
        """How often to call :meth:`watchdog`: half ``WATCHDOG_USEC``; None without a watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> None:
        """Start-up is complete (``READY=1``), optionally with a first ``STATUS=`` line."""
        self.notify("READY=1", *(() if status is None else (_status(status),)))

    def status(self, text: str) -> None:
        """Show ``text`` as the unit's status line in ``systemctl status`` (one line)."""
        self.notify(_status(text))

    def watchdog(self) -> None:
        """Tell systemd the daemon is healthy (``WATCHDOG=1``); a no-op without a watchdog."""
        if self._watchdog_usec is not None:
            self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        """The daemon has begun shutting down (``STOPPING=1``)."""
        self.notify("STOPPING=1")

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments as one datagram; whether it was sent."""
        if self._address is None or not assignments:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            self._warn_once(f"cannot notify systemd at {self._shown_address()}: {exc}")
            return False
        return True

    def _shown_address(self) -> str:
        return (self._address or "").replace("\0", "@", 1)

    def _warn_once(self, message: str) -> None:
        with self._warn_lock:
            if self._warned:
                return
            self._warned = True
        log.warning("%s (later failures are not logged)", message)


def _socket_address(name: str) -> str | None:
    """The AF_UNIX address of a ``NOTIFY_SOCKET`` value: a path, or ``@name`` (abstract)."""
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return "\0" + name[1:]
    log.warning("NOTIFY_SOCKET=%r is not a socket path or @abstract name: not notifying", name)
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """``WATCHDOG_USEC`` if the watchdog is meant for process ``pid``, else None."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid and (not _is_number(watchdog_pid) or int(watchdog_pid) != pid):
        return None
    if not _is_number(usec) or int(usec) == 0:
        log.warning("WATCHDOG_USEC=%r is not a positive number: no watchdog pings", usec)
        return None
    return int(usec)


def _is_number(text: str) -> bool:
    """Only ASCII digits: ``int()`` would also take signs, spaces, underscores and other scripts."""
    return text.isascii() and text.isdigit()


def _status(text: str) -> str:
    """A ``STATUS=`` assignment; a newline in ``text`` would start another assignment."""
    return "STATUS=" + " ".join(text.splitlines())
