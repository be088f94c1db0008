"""The benchmark's machinery: the emulators in this process, billing-responder as a child process.

The Gmail and Stripe emulators run as threads of the benchmark, so the daemon, started as its own
process, is the only thing whose CPU time and peak memory ``os.wait4`` reports. Each measurement
gets a fresh :class:`Sandbox` (emulators, config, token, key and ledger in a scratch folder) and
one or more :class:`Daemon` processes. :class:`NotifySocket` plays systemd's part for ``run``:
it receives the sd_notify datagrams, READY=1 among them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from billing_responder.sandbox.demo import write_sandbox_config
from billing_responder.sandbox.gmail import GmailEmulator
from billing_responder.sandbox.inbox import MAILBOX, person_mail
from billing_responder.sandbox.stripe import SEARCH_RATE_LIMIT, StripeEmulator

_SPAWN = Path(__file__).resolve().with_name("spawn.py")
#: What the config says for a limit the benchmark takes out of the way (replies per hour, sends
#: per day, and, where the scenario lifts them, the Gmail quota and Stripe's request rates).
LIFTED = 1_000_000
#: Variables of the benchmark's own environment the daemon must not inherit: another config or
#: key, a systemd socket, a proxy that 127.0.0.1 traffic could be sent through.
_NOT_INHERITED = (
    "BILLING_RESPONDER_CONFIG", "STRIPE_API_KEY", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET",
    "WATCHDOG_USEC", "WATCHDOG_PID",
)  # fmt: skip
_SUBJECTS = (
    "Where is my invoice for {month}?",
    "Billing question about my account",
    "Invoice {number} looks wrong",
    "Please update my billing details",
)
_MONTHS = ("January", "February", "March", "April", "May", "June")


@dataclass(frozen=True)
class Conditions:
    """What the emulated services are like during one measurement."""

    #: Gmail units per minute, enforced by the emulator and set as ``[gmail]
    #: quota_units_per_minute``; None: no quota (the config then says :data:`LIFTED`).
    quota: int | None
    gmail_latency_ms: float
    stripe_latency_ms: float
    #: Stripe's rate limits in force: the emulator's 20 searches a second and the daemon's
    #: ``[stripe]`` defaults. False: both lifted.
    stripe_limits: bool = True

    def describe(self) -> str:
        """One line for a table, e.g. ``Q=6000 units/min; latency Gmail 100 ms, Stripe 150 ms``."""
        quota = f"Q={self.quota} units/min" if self.quota else "no Gmail quota"
        stripe = "" if self.stripe_limits else "; Stripe rate limits lifted"
        gmail, stripe_ms = self.gmail_latency_ms, self.stripe_latency_ms
        return f"{quota}{stripe}; latency Gmail {gmail:g} ms, Stripe {stripe_ms:g} ms"


def sender(tag: str, number: int) -> str:
    """A distinct customer address: ``tag`` keeps each phase's senders apart."""
    return f"{tag}{number}@customer{number % 10}.example.com"


def billing_mail(address: str, number: int) -> bytes:
    """A billing email from ``address``, authenticated as Gmail stamps it."""
    subject = _SUBJECTS[number % len(_SUBJECTS)].format(
        month=_MONTHS[number % len(_MONTHS)], number=f"INV-{number:05d}"
    )
    body = "Hello,\n\nCould you help me with my invoice, please?\n\nThanks\n"
    return person_mail(address, subject, body, name=f"Customer {number}")


class Sandbox:
    """Both emulators under :class:`Conditions`, and a config in ``folder`` pointing at them."""

    def __init__(self, folder: Path, conditions: Conditions, *, workers: int | None) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.conditions = conditions
        self.gmail = GmailEmulator(
            address=MAILBOX,
            latency=conditions.gmail_latency_ms / 1000,
            quota_units_per_minute=conditions.quota,
        )
        self.stripe = StripeEmulator(
            latency=conditions.stripe_latency_ms / 1000,
            search_rate_limit=SEARCH_RATE_LIMIT if conditions.stripe_limits else LIFTED,
        )
        self._workers = workers
        self.config = folder / "config.toml"

    def __enter__(self) -> Self:
        self.gmail.start()
        self.stripe.start()
        self.config = write_sandbox_config(self.folder, self.gmail, self.stripe)
        self._override_config()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.gmail.stop()
        self.stripe.stop()

    def _override_config(self) -> None:
        """Add the benchmark's keys to the config ``write_sandbox_config`` wrote."""
        quota = self.conditions.quota
        overrides: dict[str, dict[str, Any]] = {
            "gmail": {"quota_units_per_minute": quota if quota else LIFTED},
            "limits": {"max_replies_per_hour": LIFTED, "max_sends_per_day": LIFTED},
        }
        if not self.conditions.stripe_limits:
            overrides["stripe"] = {
                "requests_per_second": LIFTED,
                "search_requests_per_second": LIFTED,
            }
        if self._workers is not None:
            overrides["concurrency"] = {"workers": self._workers}
        tables = tomllib.loads(self.config.read_text(encoding="utf-8"))
        for name, values in overrides.items():
            tables.setdefault(name, {}).update(values)
        self.config.write_text(_toml(tables), encoding="utf-8")

    def add_customers(self, addresses: Sequence[str]) -> None:
        """Make each address a Stripe customer with an active subscription."""
        for address in addresses:
            self.stripe.add_customer(
                address, name=address.partition("@")[0], subscription_statuses=["active"]
            )

    def deliver(self, address: str, number: int, *, at_ms: int | None = None) -> str:
        """Deliver a billing email from ``address`` (received ``at_ms``); returns its thread id."""
        _, thread_id = self.gmail.deliver(billing_mail(address, number), internal_date_ms=at_ms)
        return thread_id

    def replies_sent(self) -> int:
        """Answered messages.send calls so far, from the request log (cheap enough to poll)."""
        return sum(
            1
            for r in self.gmail.requests
            if r.status == 200 and r.method == "POST" and r.path.endswith("/messages/send")
        )


def _toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """A config of flat tables as TOML (JSON's string, number and list syntax is TOML's too)."""
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, Mapping):
                raise TypeError(f"nested table [{name}.{key}] is not supported")
            shown = str(value).lower() if isinstance(value, bool) else json.dumps(value)
            lines.append(f"{key} = {shown}")
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class Exit:
    """How a daemon process ended, and what it cost (from ``os.wait4``)."""

    code: int  # exit status; negative: killed by that signal
    cpu_seconds: float  # ru_utime + ru_stime
    peak_rss_kib: int  # ru_maxrss (KiB on Linux)
    seconds: float  # from just before it was started until it was reaped
    timed_out: bool = False

    @property
    def peak_rss_mib(self) -> float:
        """Peak resident set size in MiB."""
        return self.peak_rss_kib / 1024


class Daemon:
    """One ``billing-responder`` process; its stdout and stderr go to ``log``.

    It is started through :mod:`spawn`, a few-MiB process that reports the daemon's own
    ``os.wait4`` figures: a direct child's ``ru_maxrss`` would count the benchmark's memory.
    """

    def __init__(
        self,
        command: Sequence[str],
        args: Sequence[str],
        *,
        cwd: Path,
        log: Path,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self._argv = [*command, *args]
        self._cwd = cwd
        self._log = log
        self._result = log.with_suffix(".rusage.json")
        self._environment = dict(environment or {})
        self._spawner: subprocess.Popen[bytes] | None = None
        self._exit: Exit | None = None
        self.pid = 0
        #: time.time() and time.monotonic() when the daemon itself was started.
        self.started = 0.0
        self.started_monotonic = 0.0

    def start(self) -> Self:
        """Start the process; returns once it runs."""
        self._log.parent.mkdir(parents=True, exist_ok=True)
        spawned = Path(f"{self._result}.spawned")
        for stale in (self._result, spawned):
            stale.unlink(missing_ok=True)
        with self._log.open("wb") as output:
            self._spawner = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_SPAWN), str(self._result), *self._argv],
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=daemon_environment(self._environment),
            )
        deadline = time.monotonic() + 30
        while not spawned.exists():
            if self._spawner.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"could not start {self._argv}: see {self._log}")
            time.sleep(0.001)
        started = json.loads(spawned.read_text(encoding="utf-8"))
        self.pid, self.started, self.started_monotonic = (
            started["pid"], started["time"], started["monotonic"]
        )  # fmt: skip
        return self

    def poll(self) -> Exit | None:
        """The exit, once the process has ended; None while it runs."""
        if self._exit is None and self._spawner is not None and self._spawner.poll() is not None:
            ended = json.loads(self._result.read_text(encoding="utf-8"))
            self._exit = Exit(
                code=os.waitstatus_to_exitcode(ended["status"]),
                cpu_seconds=ended["utime"] + ended["stime"],
                peak_rss_kib=ended["maxrss"],
                seconds=time.monotonic() - self.started_monotonic,
            )
        return self._exit

    def wait(
        self,
        timeout: float,
        *,
        every: float = 15.0,
        progress: Callable[[float], None] | None = None,
    ) -> Exit:
        """Wait for the exit, calling ``progress(elapsed)`` every ``every`` seconds; stop the
        process once ``timeout`` seconds have passed since it started."""
        next_report = every
        while (ended := self.poll()) is None:
            elapsed = time.monotonic() - self.started_monotonic
            if elapsed > timeout:
                return self.stop(timed_out=True)
            if progress is not None and elapsed >= next_report:
                progress(elapsed)
                next_report += every
            time.sleep(0.05)
        return ended

    def stop(self, *, grace: float = 30.0, timed_out: bool = False) -> Exit:
        """SIGTERM (as systemd stops it), SIGKILL after ``grace`` seconds; the exit."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.poll() is None:
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    deadline += grace
                time.sleep(0.01)
        assert self._exit is not None
        if timed_out:
            self._exit = dataclasses.replace(self._exit, timed_out=True)
        return self._exit

    def log_tail(self, lines: int = 5) -> str:
        """The last ``lines`` lines the process wrote."""
        text = self._log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def daemon_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The benchmark's environment minus what could point the daemon elsewhere, plus ``extra``."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in _NOT_INHERITED and not key.lower().endswith("_proxy")
    }
    environment["NO_PROXY"] = environment["no_proxy"] = "127.0.0.1,localhost"
    environment.update(extra)
    return environment


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's ``NOTIFY_SOCKET``.

    A thread reads every datagram as it comes: the daemon's notifier blocks once the socket's
    queue is full (ten datagrams by default on Linux), as it would if systemd stopped reading.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self._lock = threading.Lock()
        self._received: list[tuple[float, str]] = []  # (time.monotonic(), datagram)
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._received.append((time.monotonic(), data.decode("utf-8", "replace")))

    def first(self, assignment: str, after: float = 0.0) -> float | None:
        """When (time.monotonic()) a datagram holding the line ``assignment`` first came."""
        with self._lock:
            for at, datagram in self._received:
                if at >= after and assignment in datagram.splitlines():
                    return at
        return None

    def wait_for(self, assignment: str, daemon: Daemon, timeout: float) -> float | None:
        """When ``assignment`` (e.g. ``READY=1``) came from ``daemon``; None if the daemon ended
        or ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.first(assignment, after=daemon.started_monotonic)
            if at is not None:
                return at
            if daemon.poll() is not None:
                return None
            time.sleep(0.005)
        return None

    def close(self) -> None:
        """Stop reading and remove the socket."""
        self._closed.set()
        self._reader.join()
        self._socket.close()
        self.path.unlink(missing_ok=True)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **_git(),
    }


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False, timeout=30
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or None, "uncommitted_changes": bool(changed)}


def daemon_version(command: Sequence[str]) -> str:
    """What ``billing-responder --version`` says."""
    done = subprocess.run(
        [*command, "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=daemon_environment({}),
    )
    return (done.stdout or done.stderr).strip()
