"""Run a command as the benchmark's grandchild and report what it alone cost.

Linux keeps a process's peak RSS (``ru_maxrss``) across ``exec``, and a child the benchmark
starts begins life sharing or copying the benchmark's memory: the emulators, matplotlib and, in
the largest drain, 10,000 stored messages. ``ru_maxrss`` of a direct child therefore measures the
parent (``python -c pass`` started from the benchmark "peaks" at the benchmark's size). This
small process, started with ``python -I -S`` so that it holds a few MiB, spawns the command
instead and reports the command's own ``os.wait4`` figures::

    python -I -S spawn.py RESULT COMMAND [ARG...]

RESULT.spawned gets ``{"pid", "monotonic", "time"}`` as soon as the command runs; RESULT gets
``{"status", "utime", "stime", "maxrss"}`` when it has ended. SIGTERM and SIGINT are passed on
to the command; this process exits as the command did. Standard library only: no site-packages.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from types import FrameType


def main(argv: list[str]) -> int:
    """Spawn ``argv[1:]``, wait for it, write what it cost to ``argv[0]``; its exit code."""
    result, command = argv[0], argv[1:]
    pid = os.posix_spawnp(command[0], command, os.environ)
    spawned = {"pid": pid, "monotonic": time.monotonic(), "time": time.time()}
    _write(result + ".spawned", spawned)

    def forward(signum: int, frame: FrameType | None) -> None:
        os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    _, status, usage = os.wait4(pid, 0)  # retried after each forwarded signal (PEP 475)
    ended = {
        "status": status,
        "utime": usage.ru_utime,
        "stime": usage.ru_stime,
        "maxrss": usage.ru_maxrss,
    }
    _write(result, ended)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _write(path: str, document: dict[str, float]) -> None:
    """Write ``document`` whole, so a reader never sees half of it."""
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(document, file)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
