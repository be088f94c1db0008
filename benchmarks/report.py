"""What the numbers mean: the issue's targets, the tables, the JSON, the plots, the README section.

Every target of issue 6 is one :class:`Check` row: what was measured, the target, and whether it
was met (``None`` when it does not apply, e.g. the quota ratio of a drain run without a quota, or
when the phase produced no number).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phases import UNITS_PER_REPLY, Drain, RunMode

RATIO_TARGET = 0.9
SHARE_429_TARGET = 0.01
UNITS_TARGET = 1.05 * UNITS_PER_REPLY
CPU_MS_TARGET = 10.0
RSS_MB_TARGET = 80.0  # MB = 10^6 bytes, the stricter reading of the "80 MB"
RSS_TARGET_FROM = 10_000  # the RSS target is stated for N = 10,000
P50_TARGET = 4.0
P95_TARGET = 8.0
STARTUP_TARGET = 1.5
README_START = "<!-- benchmark:start -->"
README_END = "<!-- benchmark:end -->"


@dataclass(frozen=True)
class Check:
    """One row of the targets table."""

    measure: str
    value: str
    target: str
    met: bool | None

    @property
    def verdict(self) -> str:
        """``yes``, ``NO`` or ``n/a``."""
        return "n/a" if self.met is None else "yes" if self.met else "NO"


def checks(drains: Sequence[Drain], run: RunMode | None) -> list[Check]:
    """Every target of the issue, judged."""
    rows: list[Check] = []
    for drain in drains:
        rows += _drain_checks(drain)
    if run is not None:
        rows += _run_checks(run)
    return rows


def _drain_checks(d: Drain) -> list[Check]:
    name = f"Drain N={d.n:,}"
    complete = d.replies == d.n and not d.drain.timed_out
    rows = [Check(f"{name}: messages answered", f"{d.replies:,} of {d.n:,}", "all", complete)]
    rates = d.rates
    if rates.ceiling is None:
        rows.append(Check(f"{name}: ratio to quota ceiling", "n/a (no quota)", "≥ 0.90", None))
    else:
        ceiling = f"{rates.ceiling:.3f}/s"
        rows.append(
            Check(
                f"{name}: ratio to quota ceiling (first to last reply)",
                _ratio(rates.ratio, rates.first_to_last, ceiling),
                f"≥ {RATIO_TARGET:.2f}",
                _at_least(rates.ratio, RATIO_TARGET, complete),
            )
        )
        if rates.steady is not None:
            rows.append(
                Check(
                    f"{name}: ratio to quota ceiling (steady, after the first 60 s)",
                    _ratio(rates.ratio_steady, rates.steady, ceiling),
                    f"≥ {RATIO_TARGET:.2f}",
                    _at_least(rates.ratio_steady, RATIO_TARGET, complete),
                )
            )
        rows.append(
            Check(
                f"{name}: Gmail requests answered 429",
                f"{d.gmail_429:,} of {d.drain.gmail_requests:,} ({d.gmail_429_share:.2%})",
                f"< {SHARE_429_TARGET:.0%}",
                d.gmail_429_share < SHARE_429_TARGET,
            )
        )
    rows.append(
        Check(
            f"{name}: quota units per reply",
            _number(d.units_per_reply, ".1f"),
            f"≤ {UNITS_TARGET:.1f} (1.05 x {UNITS_PER_REPLY})",
            _at_most(d.units_per_reply, UNITS_TARGET),
        )
    )
    rows.append(
        Check(
            f"{name}: CPU per reply, start-up subtracted",
            _number(d.cpu_ms_per_reply, ".2f", " ms"),
            f"≤ {CPU_MS_TARGET:g} ms",
            _at_most(d.cpu_ms_per_reply, CPU_MS_TARGET),
        )
    )
    rss_mb = d.drain.peak_rss_mib * 1024**2 / 1e6
    judged = d.n >= RSS_TARGET_FROM
    rows.append(
        Check(
            f"{name}: peak RSS",
            f"{d.drain.peak_rss_mib:.1f} MiB ({rss_mb:.1f} MB)",
            f"≤ {RSS_MB_TARGET:g} MB" if judged else f"(≤ {RSS_MB_TARGET:g} MB at N=10,000)",
            rss_mb <= RSS_MB_TARGET if judged else None,
        )
    )
    return rows


def _run_checks(run: RunMode) -> list[Check]:
    rows: list[Check] = []
    idle = run.idle
    if idle is not None:
        calls = ", ".join(f"{call} x{count}" for call, count in idle.calls.items()) or "none"
        rows.append(
            Check(
                f"Idle poll: Gmail requests per cycle ({idle.cycles} polls, every "
                f"{idle.interval_seconds:g} s)",
                f"{idle.requests_per_cycle:.2f} ({calls})",
                "1",
                0 < idle.requests_per_cycle <= 1,  # none at all: it is not polling
            )
        )
        units = f"{idle.units_per_cycle:.2f}"
        rows.append(
            Check("Idle poll: quota units per cycle", units, "≤ 2", idle.units_per_cycle <= 2)
        )
    latency = run.latency
    if latency is not None:
        answered = latency.replied == latency.delivered
        shown = f"{latency.replied} of {latency.delivered}"
        rows.append(Check("Arrival to reply: messages answered", shown, "all", answered))
        for label, value, target in (
            ("p50", latency.p50, P50_TARGET),
            ("p95", latency.p95, P95_TARGET),
        ):
            rows.append(
                Check(
                    f"Arrival to reply, {label} (one every {latency.every_seconds:g} s)",
                    _number(value, ".2f", " s"),
                    f"≤ {target:g} s",
                    _at_most(value, target, answered),
                )
            )
        rows.append(Check("Arrival to reply, max", _number(latency.max, ".2f", " s"), "—", None))
    samples = ", ".join(f"{s:.2f}" for s in run.startup.samples) or "none"
    rows.append(
        Check(
            f"Start-up to READY=1 (median of {len(run.startup.samples)})",
            f"{_number(run.startup.median, '.2f', ' s')} ({samples})",
            f"≤ {STARTUP_TARGET:g} s",
            _at_most(run.startup.median, STARTUP_TARGET),
        )
    )
    return rows


def _ratio(ratio: float | None, rate: float | None, ceiling: str) -> str:
    if ratio is None or rate is None:
        return "no rate (fewer than two replies)"
    return f"{ratio:.2f} ({rate:.3f}/s vs {ceiling})"


def _at_least(value: float | None, target: float, valid: bool = True) -> bool | None:
    if value is None:
        return None
    return valid and value >= target


def _at_most(value: float | None, target: float, valid: bool = True) -> bool | None:
    return None if value is None else valid and value <= target


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


# -- tables ---------------------------------------------------------------------------------------

TARGET_HEADER = ("Measure", "Measured", "Target", "Met?")
DRAIN_HEADER = (
    "N", "Conditions", "Answered", "Drain s", "Replies/s first→last", "Replies/s overall",
    "Replies/s steady", "Ceiling/s", "Ratio", "Gmail 429s", "Units/reply", "CPU ms/reply",
    "Baseline CPU s", "Peak RSS MiB", "Emulators' CPU ms/reply",
)  # fmt: skip


def target_rows(rows: Sequence[Check]) -> list[tuple[str, ...]]:
    """The targets table's rows."""
    return [(c.measure, c.value, c.target, c.verdict) for c in rows]


def drain_rows(drains: Sequence[Drain]) -> list[tuple[str, ...]]:
    """The drains table's rows: one per N."""
    rows: list[tuple[str, ...]] = []
    for d in drains:
        r = d.rates
        ratio = "n/a" if r.ceiling is None else _number(r.ratio, ".2f")
        if r.ratio_steady is not None:
            ratio += f" (steady {r.ratio_steady:.2f})"
        timed_out = " (timed out)" if d.drain.timed_out else ""
        rows.append(
            (
                f"{d.n:,}",
                d.conditions.describe(),
                f"{d.replies:,}{timed_out}",
                f"{d.drain.seconds:.1f}",
                _number(r.first_to_last, ".3f"),
                _number(r.overall, ".3f"),
                _number(r.steady, ".3f"),
                _number(r.ceiling, ".3f"),
                ratio,
                f"{d.gmail_429:,} ({d.gmail_429_share:.2%})",
                _number(d.units_per_reply, ".1f"),
                _number(d.cpu_ms_per_reply, ".2f"),
                f"{d.baseline.cpu_seconds:.2f}",
                f"{d.drain.peak_rss_mib:.1f}",
                _number(d.harness_cpu_ms_per_reply, ".1f"),
            )
        )
    return rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to line up, for a terminal."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
             for line in [header, ["-" * w for w in widths], *rows]]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def machine_line(machine: dict[str, Any]) -> str:
    """One sentence: when, on what, at which commit."""
    commit = (machine.get("commit") or "unknown")[:10]
    if machine.get("uncommitted_changes"):
        commit += " with uncommitted changes"
    return (
        f"Measured {machine['date']} on {machine['cpu']} ({machine['cores']} cores), "
        f"{machine['memory_gib']} GiB RAM, Python {machine['python']}, "
        f"{machine.get('daemon_version', 'billing-responder')} at commit {commit}."
    )


# -- files ----------------------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """Dataclasses (nested) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    """``document`` as indented JSON."""
    path.write_text(json.dumps(to_json(document), indent=2, ensure_ascii=False) + "\n", "utf-8")


def markdown(
    rows: Sequence[Check],
    drains: Sequence[Drain],
    machine: dict[str, Any],
    *,
    images: Path,
    notes: Sequence[str],
) -> str:
    """The whole report as Markdown; image links relative to the folder ``images`` names."""
    parts = [
        "# billing-responder benchmark",
        "",
        machine_line(machine),
        "",
        "## Targets (issue 6)",
        "",
        markdown_table(TARGET_HEADER, target_rows(rows)),
        "",
    ]
    if drains:
        parts += ["## Backlog drains", "", markdown_table(DRAIN_HEADER, drain_rows(drains)), ""]
    parts += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    parts += [
        f"![Replies over time]({images / 'drain.png'})",
        "",
        f"![Arrival-to-reply latency]({images / 'latency.png'})",
        "",
    ]
    return "\n".join(parts)


def update_readme(readme: Path, section: str) -> bool:
    """Put ``section`` between the benchmark markers of ``readme``; False without the markers."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    before, after = text[: start + len(README_START)], text[end:]
    readme.write_text(f"{before}\n{section.strip()}\n{after}", encoding="utf-8")
    return True


def readme_section(rows: Sequence[Check], machine: dict[str, Any], out: Path, root: Path) -> str:
    """The README's benchmark section: the targets table, the machine line, the two plots."""
    link = Path(os.path.relpath(out, root))
    return "\n".join(
        [
            markdown_table(TARGET_HEADER, target_rows(rows)),
            "",
            machine_line(machine) + f" Details: [{link / 'latest.md'}]({link / 'latest.md'}).",
            "",
            f"![Backlog drain: replies over time]({link / 'drain.png'})",
            f"![Arrival-to-reply latency]({link / 'latency.png'})",
        ]
    )
