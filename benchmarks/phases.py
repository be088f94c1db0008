"""The measurements: backlog drains (``once``) and the ``run`` phases (start-up, idle, latency).

Each returns a plain dataclass of numbers; :mod:`report` judges them against the issue's targets.
Rates and latencies come from the Gmail emulator's own record of when each reply was sent (a
SENT message's internalDate), not from the daemon's logs; CPU time and peak RSS from ``os.wait4``.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import Conditions, Daemon, Exit, NotifySocket, Sandbox, sender

from billing_responder.config import load_config

#: Quota units one reply needs at the least: messages.get (metadata) 5, messages.send 100,
#: messages.modify 5.
UNITS_PER_REPLY = 110
#: A drain longer than this also gets a steady-state rate, over what was sent after...
STEADY_MIN_SECONDS = 120.0
#: ...its first this many seconds (the first minute may spend a whole fresh quota window at once).
STEADY_SKIP_SECONDS = 60.0
#: Runs of `once` against an empty mailbox before each drain; the cheapest is the baseline (the
#: first may compile bytecode or warm caches the drain then finds warm).
BASELINE_RUNS = 2
#: Points kept of each drain's replies-over-time curve (for the JSON and the plot).
CURVE_POINTS = 400
_MESSAGE_ID = re.compile(r"/[0-9a-f]{16}(?=/|$)")


@dataclass(frozen=True)
class Setup:
    """What every measurement shares."""

    command: tuple[str, ...]  # how to start billing-responder
    workers: int | None  # [concurrency] workers; None: the default
    scratch: Path  # configs, ledgers and sockets
    logs: Path  # the daemon's output, one file per process
    say: Callable[[str], None]  # progress, for the person waiting


@dataclass(frozen=True)
class Cost:
    """What one daemon process cost: its exit and the Gmail traffic it caused."""

    exit_code: int
    timed_out: bool
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    gmail_requests: int
    gmail_units: int


@dataclass(frozen=True)
class Rates:
    """How fast a drain went, in replies per second, and how that compares with the quota."""

    first_to_last: float | None  # between the first and the last reply
    overall: float | None  # from the process start to the last reply
    steady: float | None  # after the first 60 s, for drains over 2 minutes
    ceiling: float | None  # Q / 60 / 110; None without a quota
    ratio: float | None  # first_to_last / ceiling
    ratio_steady: float | None  # steady / ceiling
    ratio_note: str


@dataclass(frozen=True)
class Drain:
    """One backlog drain: N billing emails, one ``once``."""

    n: int
    conditions: Conditions
    baseline: Cost  # `once` against an empty mailbox, same conditions: the cheapest run
    baseline_cpu_seconds: list[float]  # every baseline run's
    drain: Cost
    seed_seconds: float
    replies: int  # distinct seeded threads answered
    duplicates: int  # replies beyond one per thread (should be 0)
    first_reply_seconds: float | None  # since the process was started
    last_reply_seconds: float | None
    rates: Rates
    gmail_429: int
    gmail_429_share: float
    stripe_requests: int
    stripe_429: int
    units_per_reply: float | None
    cpu_ms_per_reply: float | None  # (cpu - baseline cpu) / replies
    harness_cpu_ms_per_reply: float | None  # the emulators' CPU (this process), for scale
    curve: list[tuple[float, int]] = field(default_factory=list)  # (seconds, replies so far)


@dataclass(frozen=True)
class Startup:
    """Start-up to READY=1, several starts of ``run``."""

    samples: list[float]  # seconds from Popen to READY=1; the first start also creates labels
    median: float | None


@dataclass(frozen=True)
class Idle:
    """``run`` with nothing to do, over whole poll intervals."""

    interval_seconds: float
    cycles: int
    requests: int
    units: int
    requests_per_cycle: float
    units_per_cycle: float
    calls: dict[str, int]  # "GET history": 6, ...


@dataclass(frozen=True)
class Latency:
    """Arrival-to-reply in ``run``: mail delivered at a steady rate while it polls."""

    every_seconds: float
    delivered: int
    replied: int
    samples: list[float]  # seconds from delivery to the reply's send, per answered message
    p50: float | None
    p95: float | None
    max: float | None
    mean: float | None


@dataclass(frozen=True)
class RunMode:
    """The ``run`` phases, on one sandbox."""

    conditions: Conditions
    startup: Startup
    idle: Idle | None
    latency: Latency | None
    process: Cost | None  # the last `run` process, over idle and latency together


# -- backlog drain --------------------------------------------------------------------------------


def measure_drain(n: int, conditions: Conditions, setup: Setup) -> Drain:
    """Seed ``n`` billing emails from ``n`` customers and time one ``once`` answering them."""
    tag = f"drain-{n}"
    setup.say(f"[{tag}] baseline: once against an empty mailbox ({conditions.describe()})")
    baselines = []
    for number in range(1, BASELINE_RUNS + 1):
        name = f"{tag}-baseline-{number}"
        with Sandbox(setup.scratch / name, conditions, workers=setup.workers) as empty:
            baselines.append(_once(empty, setup, name, timeout=600))
    baseline = min(baselines, key=lambda cost: cost.cpu_seconds)
    with Sandbox(setup.scratch / tag, conditions, workers=setup.workers) as sandbox:
        seeding = time.monotonic()
        addresses = [sender("d", i) for i in range(n)]
        sandbox.add_customers(addresses)
        threads = {sandbox.deliver(address, i) for i, address in enumerate(addresses)}
        seed_seconds = time.monotonic() - seeding
        setup.say(f"[{tag}] seeded {n} messages and customers in {seed_seconds:.1f} s; draining")
        harness_before = _own_cpu()
        daemon = Daemon(
            setup.command, ["--config", str(sandbox.config), "once"],
            cwd=sandbox.folder, log=setup.logs / f"{tag}.log",
        ).start()  # fmt: skip

        def progress(elapsed: float) -> None:
            setup.say(f"[{tag}] {sandbox.replies_sent()}/{n} replies after {elapsed:.0f} s")

        try:
            ended = daemon.wait(_drain_timeout(n, conditions), progress=progress)
        finally:
            daemon.stop()  # only if it still runs: interrupted
        harness_cpu = _own_cpu() - harness_before
        if ended.code != 0 or ended.timed_out:
            setup.say(f"[{tag}] once ended with {ended.code}: {daemon.log_tail(3)}")
        drain = _cost(ended, sandbox)
        sent = [(thread, ms) for _, thread, ms in sandbox.gmail.sent_times() if thread in threads]
        statuses = [r.status for r in sandbox.gmail.requests]
        stripe_statuses = [r.status for r in sandbox.stripe.requests]
    offsets = sorted(ms / 1000 - daemon.started for _, ms in sent)
    replies = len({thread for thread, _ in sent})
    gmail_429 = statuses.count(429)
    return Drain(
        n=n,
        conditions=conditions,
        baseline=baseline,
        baseline_cpu_seconds=[cost.cpu_seconds for cost in baselines],
        drain=drain,
        seed_seconds=seed_seconds,
        replies=replies,
        duplicates=len(sent) - replies,
        first_reply_seconds=offsets[0] if offsets else None,
        last_reply_seconds=offsets[-1] if offsets else None,
        rates=_rates(offsets, conditions.quota),
        gmail_429=gmail_429,
        gmail_429_share=gmail_429 / len(statuses) if statuses else 0.0,
        stripe_requests=len(stripe_statuses),
        stripe_429=stripe_statuses.count(429),
        units_per_reply=drain.gmail_units / replies if replies else None,
        cpu_ms_per_reply=(
            (drain.cpu_seconds - baseline.cpu_seconds) / replies * 1000 if replies else None
        ),
        harness_cpu_ms_per_reply=harness_cpu / replies * 1000 if replies else None,
        curve=_curve(offsets),
    )


def _once(sandbox: Sandbox, setup: Setup, name: str, *, timeout: float) -> Cost:
    daemon = Daemon(
        setup.command, ["--config", str(sandbox.config), "once"],
        cwd=sandbox.folder, log=setup.logs / f"{name}.log",
    ).start()  # fmt: skip
    ended = daemon.wait(timeout)
    if ended.code != 0:
        setup.say(f"[{name}] once ended with {ended.code}: {daemon.log_tail(3)}")
    return _cost(ended, sandbox)


def _cost(ended: Exit, sandbox: Sandbox) -> Cost:
    return Cost(
        exit_code=ended.code,
        timed_out=ended.timed_out,
        seconds=ended.seconds,
        cpu_seconds=ended.cpu_seconds,
        peak_rss_mib=ended.peak_rss_mib,
        gmail_requests=len(sandbox.gmail.requests),
        gmail_units=sandbox.gmail.units_used,
    )


def _drain_timeout(n: int, conditions: Conditions) -> float:
    """Three times the quota-bound drain time (at least 10 minutes); unthrottled, 0.3 s a reply."""
    if conditions.quota:
        return max(600.0, 3 * n * UNITS_PER_REPLY / conditions.quota * 60)
    return max(600.0, 0.3 * n)


def _rates(offsets: Sequence[float], quota: int | None) -> Rates:
    """The three drain rates and, under a quota, their ratios to its ceiling."""

    def rate(times: Sequence[float]) -> float | None:
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        return (len(times) - 1) / span if span > 0 else None

    first_to_last = rate(offsets)
    overall = len(offsets) / offsets[-1] if offsets and offsets[-1] > 0 else None
    steady = None
    if len(offsets) > 1 and offsets[-1] - offsets[0] > STEADY_MIN_SECONDS:
        steady = rate([t for t in offsets if t >= offsets[0] + STEADY_SKIP_SECONDS])
    ceiling = quota / 60 / UNITS_PER_REPLY if quota else None

    def ratio(value: float | None) -> float | None:
        return value / ceiling if value is not None and ceiling else None

    if ceiling is None:
        note = "n/a: no quota enforced (this drain measures CPU and memory growth)"
    else:
        note = "first-to-last-reply rate / ceiling"
        if steady is not None:
            note += "; steady: rate after the first 60 s / ceiling"
    return Rates(first_to_last, overall, steady, ceiling, ratio(first_to_last), ratio(steady), note)


def _curve(offsets: Sequence[float]) -> list[tuple[float, int]]:
    """Replies so far against seconds, thinned to about :data:`CURVE_POINTS` points."""
    step = max(1, math.ceil(len(offsets) / CURVE_POINTS))
    points = [(round(t, 3), i + 1) for i, t in enumerate(offsets) if i % step == 0]
    if offsets and points[-1][1] != len(offsets):
        points.append((round(offsets[-1], 3), len(offsets)))
    return points


def _own_cpu() -> float:
    """CPU seconds of this process: the emulators' threads and the benchmark's own loop."""
    times = os.times()
    return times.user + times.system


# -- run mode -------------------------------------------------------------------------------------


def measure_run_mode(
    conditions: Conditions,
    setup: Setup,
    *,
    starts: int,
    idle_cycles: int,
    every: float,
    duration: float,
) -> RunMode:
    """Start ``run`` ``starts`` times (to READY=1); leave the last one running for the idle
    measurement over ``idle_cycles`` polls, then deliver mail every ``every`` seconds for
    ``duration`` seconds and time each reply."""
    with Sandbox(setup.scratch / "run", conditions, workers=setup.workers) as sandbox:
        interval = load_config(sandbox.config).schedule.interval_seconds
        count = max(1, math.floor(duration / every))
        addresses = [sender("r", i) for i in range(count)]
        sandbox.add_customers(addresses)
        samples: list[float] = []
        for number in range(1, starts + 1):
            notify = NotifySocket(sandbox.folder / f"notify-{number}.sock")
            daemon = Daemon(
                setup.command, ["--config", str(sandbox.config), "run"],
                cwd=sandbox.folder, log=setup.logs / f"run-{number}.log",
                environment={"NOTIFY_SOCKET": str(notify.path)},
            ).start()  # fmt: skip
            at = notify.wait_for("READY=1", daemon, timeout=120)
            if at is None:
                setup.say(f"[run] start {number}: no READY=1: {daemon.log_tail(3)}")
                daemon.stop()
                notify.close()
                break
            samples.append(at - daemon.started_monotonic)
            setup.say(f"[run] start {number}: READY=1 after {samples[-1]:.2f} s")
            if number < starts:
                daemon.stop()
                notify.close()
        startup = Startup(samples, statistics.median(samples) if samples else None)
        if len(samples) < starts:
            return RunMode(conditions, startup, None, None, None)
        # The last start goes on; its socket is read until it stops (a full queue would block it).
        try:
            idle = _idle(sandbox, setup, interval, idle_cycles)
            latency = _latency(sandbox, setup, daemon, interval, addresses, every)
        finally:
            process = _cost(daemon.stop(), sandbox)
            notify.close()
    return RunMode(conditions, startup, idle, latency, process)


def _idle(sandbox: Sandbox, setup: Setup, interval: float, cycles: int) -> Idle:
    """Requests and units over ``cycles`` whole intervals, each window edge between two polls."""
    time.sleep(2 * interval)  # the first cycle (a full search) is over
    polls = [r.received for r in sandbox.gmail.requests if r.path != "/token"]
    start = max(polls, default=time.time()) + interval / 2
    while start < time.time():
        start += interval
    end = start + cycles * interval
    wait = end - time.time()
    setup.say(f"[run] idle: counting Gmail requests over {cycles} polls ({wait:.0f} s)")
    time.sleep(start - time.time())
    units_before = sandbox.gmail.units_used
    time.sleep(end - time.time())
    units = sandbox.gmail.units_used - units_before
    window = [r for r in sandbox.gmail.requests if start <= r.received < end]
    calls = Counter(f"{r.method} {_call_name(r.path)}" for r in window)
    return Idle(
        interval_seconds=interval,
        cycles=cycles,
        requests=len(window),
        units=units,
        requests_per_cycle=len(window) / cycles,
        units_per_cycle=units / cycles,
        calls=dict(sorted(calls.items())),
    )


def _call_name(path: str) -> str:
    """``/gmail/v1/users/me/messages/18f0.../modify`` → ``messages/{id}/modify``."""
    return _MESSAGE_ID.sub("/{id}", path).removeprefix("/gmail/v1/users/me/")


def _latency(
    sandbox: Sandbox,
    setup: Setup,
    daemon: Daemon,
    interval: float,
    addresses: Sequence[str],
    every: float,
) -> Latency:
    """Deliver one message every ``every`` seconds; each latency is reply sent - delivered."""
    setup.say(
        f"[run] latency: delivering {len(addresses)} messages, one every {every:g} s "
        f"({len(addresses) * every:.0f} s)"
    )
    delivered: dict[str, int] = {}  # thread id -> internalDate ms it was delivered with
    begin = time.monotonic()
    for number, address in enumerate(addresses):
        time.sleep(max(0.0, begin + number * every - time.monotonic()))
        at_ms = int(time.time() * 1000)
        delivered[sandbox.deliver(address, number, at_ms=at_ms)] = at_ms
    deadline = time.monotonic() + max(30.0, 6 * interval)
    replied: dict[str, int] = {}
    while time.monotonic() < deadline and daemon.poll() is None:
        for _, thread, ms in sandbox.gmail.sent_times():
            if thread in delivered:
                replied[thread] = min(ms, replied.get(thread, ms))
        if len(replied) == len(delivered):
            break
        time.sleep(0.25)
    samples = sorted((replied[t] - delivered[t]) / 1000 for t in replied)
    return Latency(
        every_seconds=every,
        delivered=len(delivered),
        replied=len(replied),
        samples=samples,
        p50=percentile(samples, 50),
        p95=percentile(samples, 95),
        max=samples[-1] if samples else None,
        mean=statistics.fmean(samples) if samples else None,
    )


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of sorted ``values``."""
    if not values:
        return None
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]
