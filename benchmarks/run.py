"""Benchmark billing-responder against the local Gmail and Stripe emulators (GitHub issue 6).

From the repository root, with a Python that has billing-responder and matplotlib installed::

    python benchmarks/run.py            # everything: about half an hour
    python benchmarks/run.py --quick    # N=100 and the run-mode phases: about four minutes

The emulators run in this process; billing-responder runs as a child process (``once`` for each
backlog drain, ``run`` for start-up, idle polling and arrival-to-reply latency), so its CPU time
and peak memory are its own. Results: a table on stdout, and ``latest.json``, ``latest.md``,
``drain.png`` and ``latency.png`` in ``--out``. benchmarks/README.md says what each number means.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import Conditions, daemon_version, machine
from phases import Drain, RunMode, Setup, measure_drain, measure_run_mode
from report import (
    DRAIN_HEADER,
    README_END,
    README_START,
    TARGET_HEADER,
    Check,
    checks,
    drain_rows,
    machine_line,
    markdown,
    readme_section,
    target_rows,
    text_table,
    update_readme,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (100, 1_000, 10_000)
QUICK_SIZES = (100,)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark billing-responder against the local Gmail and Stripe emulators: "
        "backlog drains, idle polling, arrival-to-reply latency and start-up time.",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        help="backlog sizes N to drain, comma-separated (default: 100,1000,10000; "
        "with --quick: 100)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N=100 only, plus the run-mode phases (a few minutes), for development",
    )
    parser.add_argument(
        "--quota",
        type=_positive_int,
        default=6000,
        help="the Gmail quota, units per minute, the emulator enforces and the config states "
        "(default: 6000)",
    )
    parser.add_argument(
        "--unthrottled-from",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="sizes from N up drain with no Gmail quota, Stripe's rate limits lifted and no "
        "latency: they measure CPU and memory growth (at 6000 units/min, 10,000 replies take "
        "3 hours) (default: 10000)",
    )
    parser.add_argument("--gmail-latency-ms", type=_milliseconds, default=100.0,
                        help="latency the Gmail emulator adds to each request (default: 100)")
    parser.add_argument("--stripe-latency-ms", type=_milliseconds, default=150.0,
                        help="latency the Stripe emulator adds to each request (default: 150)")
    parser.add_argument("--workers", type=_positive_int,
                        help="[concurrency] workers (default: the config's default)")
    parser.add_argument("--arrival-every", type=float, default=2.0, metavar="SECONDS",
                        help="latency phase: one billing email every SECONDS (default: 2)")
    parser.add_argument("--arrival-seconds", type=float, default=90.0, metavar="SECONDS",
                        help="latency phase: deliver for SECONDS (default: 90)")
    parser.add_argument("--idle-cycles", type=_positive_int, default=6, metavar="N",
                        help="idle phase: count requests over N poll intervals (default: 6)")
    parser.add_argument("--starts", type=_positive_int, default=3,
                        help="start-up phase: starts to READY=1, the median is reported "
                        "(default: 3)")
    parser.add_argument("--no-run-mode", action="store_true",
                        help="drains only: skip start-up, idle and latency")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where results go (default: benchmarks/results)")
    parser.add_argument("--update-readme", action="store_true",
                        help="put the targets table, the machine line and the plots between "
                        "<!-- benchmark:start --> and <!-- benchmark:end --> in README.md")
    parser.add_argument("--command", type=shlex.split, metavar="COMMAND",
                        help="how to start billing-responder (default: the billing-responder "
                        "script beside this Python)")  # fmt: skip
    return parser


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list such as 100,1000") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be whole numbers of at least 1")
    return sizes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _milliseconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every daemon process ended as it should, else 1."""
    args = build_parser().parse_args(argv)
    try:
        import plots  # noqa: PLC0415 - needs matplotlib: fail before, not after, the long run
    except ImportError as exc:
        print(f"benchmark: {exc}; install it with: pip install '.[bench]'", file=sys.stderr)
        return 2
    problem = _readme_problem(args.out) if args.update_readme else None
    if problem:
        print(f"benchmark: --update-readme: {problem}", file=sys.stderr)
        return 2
    command = tuple(args.command or _default_command())
    version = daemon_version(command)
    if not version.startswith("billing-responder"):
        print(f"benchmark: {shlex.join(command)} --version said {version!r}", file=sys.stderr)
        return 2
    sizes: tuple[int, ...] = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    def say(line: str) -> None:
        print(f"{time.monotonic() - began:7.1f} s  {line}", file=sys.stderr, flush=True)

    durations: dict[str, float] = {}
    drains: list[Drain] = []
    run: RunMode | None = None
    with tempfile.TemporaryDirectory(prefix="billing-responder-bench-") as scratch:
        setup = Setup(command, args.workers, Path(scratch), args.out / "logs", say)
        for n in sizes:
            started = time.monotonic()
            drains.append(measure_drain(n, _conditions(args, n), setup))
            durations[f"drain N={n}"] = time.monotonic() - started
        if not args.no_run_mode:
            started = time.monotonic()
            run = measure_run_mode(
                _conditions(args, None),
                setup,
                starts=args.starts,
                idle_cycles=args.idle_cycles,
                every=args.arrival_every,
                duration=args.arrival_seconds,
            )
            durations["run mode (start-up, idle, latency)"] = time.monotonic() - started
    durations["total"] = time.monotonic() - began
    about = machine() | {"daemon_version": version}
    rows = checks(drains, run)
    notes = _notes(args, durations, drains, run)
    print(_text_report(rows, drains, about, notes))
    _write(args.out, rows, drains, run, about, notes, durations, args)
    plots.drain_plot(args.out / "drain.png", drains)
    plots.latency_plot(args.out / "latency.png", run.latency if run else None)
    print(f"\nwrote {args.out}/latest.json, latest.md, drain.png, latency.png", file=sys.stderr)
    if args.update_readme:
        section = readme_section(rows, about, args.out.resolve(), ROOT)
        if not update_readme(ROOT / "README.md", section):
            print(f"benchmark: --update-readme: {_NO_MARKERS}", file=sys.stderr)
            return 1
    return 0 if _all_ended_well(drains, run) else 1


_NO_MARKERS = f"README.md has no {README_START} ... {README_END} section to update"


def _readme_problem(out: Path) -> str | None:
    """Why the README cannot take this run's results, found before the run, not after it."""
    if not out.resolve().is_relative_to(ROOT):
        return f"--out {out} is outside the repository: README.md could not link to its plots"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return _NO_MARKERS
    return None


def _default_command() -> list[str]:
    script = Path(sys.executable).with_name("billing-responder")
    return [str(script)] if script.exists() else [sys.executable, "-m", "billing_responder"]


def _conditions(args: argparse.Namespace, n: int | None) -> Conditions:
    """A drain of ``n`` (None: the run-mode phases) under realistic conditions, or, from
    ``--unthrottled-from`` up, with no quota, no Stripe limits and no latency."""
    if n is not None and n >= args.unthrottled_from:
        return Conditions(None, 0.0, 0.0, stripe_limits=False)
    return Conditions(args.quota, args.gmail_latency_ms, args.stripe_latency_ms)


def _all_ended_well(drains: Sequence[Drain], run: RunMode | None) -> bool:
    costs = [c for d in drains for c in (d.baseline, d.drain)]
    if run is not None and run.process is not None:
        costs.append(run.process)
    complete = run is None or run.process is not None
    return complete and all(c.exit_code == 0 and not c.timed_out for c in costs)


def _notes(
    args: argparse.Namespace,
    durations: dict[str, float],
    drains: Sequence[Drain],
    run: RunMode | None,
) -> list[str]:
    workers = args.workers or "the default"
    notes = [
        f"Settings: [concurrency] workers = {workers}; [schedule] interval_seconds, the "
        "default; [limits] max_replies_per_hour and max_sends_per_day raised to 1,000,000; "
        "[gmail] quota_units_per_minute = the emulator's quota (1,000,000 where none is "
        "enforced). Each drain and its baseline ran on fresh emulators.",
        "Drain rates count replies by the Gmail emulator's send times (the SENT message's "
        "internalDate). The ratio uses the first-to-last-reply rate; ceiling = Q / 60 / 110 "
        "replies/s (110 units: messages.get 5 + messages.send 100 + messages.modify 5). A short "
        "drain can beat the ceiling: the emulator's sliding 60 s window starts empty, so the "
        "first minute may spend a whole window at once. Drains over 2 minutes also get a steady "
        "rate, over the replies sent after the first reply's first 60 s.",
        "CPU per reply = (CPU of the drain's `once` - baseline) / replies, the baseline being "
        "the cheaper of two runs of `once` against an empty mailbox under the same conditions "
        "(start-up and exit). CPU = ru_utime + ru_stime and peak RSS = ru_maxrss of the daemon "
        "process alone (os.wait4, from a small spawner process: a direct child's ru_maxrss "
        "would count the benchmark's own memory). The emulators run in the benchmark process; "
        "their CPU per reply is shown for scale.",
        "Units per reply = units the Gmail emulator charged during the drain (start-up "
        "included; a 429 charges nothing) / replies. 429 share = Gmail requests answered 429 / "
        "all Gmail requests of the drain.",
        "Peak RSS target: 80 MB read as 80 x 10^6 bytes (76.3 MiB).",
    ]
    if run is not None:
        notes.append(
            "Idle: Gmail requests that arrived during whole poll intervals of `run` with nothing "
            "to do, the window's edges half-way between polls. Latency: a billing email "
            f"delivered every {args.arrival_every:g} s for {args.arrival_seconds:g} s while "
            "`run` polls; latency = the reply's internalDate - the delivered message's "
            "internalDate; nearest-rank percentiles. Start-up: from starting the process to the "
            "READY=1 datagram on NOTIFY_SOCKET (the first start also creates the Gmail labels); "
            f"conditions: {run.conditions.describe()}."
        )
        if run.process is not None:
            notes.append(
                f"The `run` process over the idle and latency phases: "
                f"{run.process.cpu_seconds:.2f} s CPU, peak RSS {run.process.peak_rss_mib:.1f} MiB."
            )
    for d in drains:
        notes.append(
            f"N={d.n:,}: seeding {d.seed_seconds:.1f} s; baseline `once` "
            f"{d.baseline.seconds:.1f} s, CPU {_seconds(d.baseline_cpu_seconds)}, peak RSS "
            f"{d.baseline.peak_rss_mib:.1f} MiB, {d.baseline.gmail_units} units; drain exit "
            f"{d.drain.exit_code}, "
            f"{d.duplicates} duplicate replies, Stripe {d.stripe_requests:,} requests "
            f"({d.stripe_429:,} answered 429)."
        )
    notes.append(
        "Phase durations: " + "; ".join(f"{k} {v / 60:.1f} min" for k, v in durations.items())
    )
    return notes


def _seconds(values: Sequence[float]) -> str:
    return " and ".join(f"{v:.2f} s" for v in values)


def _text_report(
    rows: Sequence[Check], drains: Sequence[Drain], about: dict[str, Any], notes: Sequence[str]
) -> str:
    parts = ["", machine_line(about), "", text_table(TARGET_HEADER, target_rows(rows)), ""]
    if drains:
        parts += [text_table(DRAIN_HEADER, drain_rows(drains)), ""]
    parts += [f"- {note}" for note in notes]
    return "\n".join(parts)


def _write(
    out: Path,
    rows: Sequence[Check],
    drains: Sequence[Drain],
    run: RunMode | None,
    about: dict[str, Any],
    notes: Sequence[str],
    durations: dict[str, float],
    args: argparse.Namespace,
) -> None:
    document: dict[str, Any] = {
        "benchmark": "billing-responder, GitHub issue 6",
        "command": shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "machine": about,
        "workers": args.workers,
        "targets": [
            {"measure": c.measure, "measured": c.value, "target": c.target, "met": c.met}
            for c in rows
        ],
        "drains": drains,
        "run_mode": run,
        "durations_seconds": durations,
        "notes": notes,
    }
    write_json(out / "latest.json", document)
    text = markdown(rows, drains, about, images=Path("."), notes=notes)
    (out / "latest.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
