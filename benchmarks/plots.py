"""The two figures: replies over time for each drain, and the arrival-to-reply histogram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator
from phases import UNITS_PER_REPLY, Drain, Latency
from report import P50_TARGET, P95_TARGET


def drain_plot(path: Path, drains: Sequence[Drain]) -> None:
    """Replies against seconds since the process started, one line per N; drains under a quota
    (with its ceiling, Q / 60 / 110 replies a second) apart from those without."""
    groups = [
        ("Under the Gmail quota", [d for d in drains if d.conditions.quota]),
        ("No quota, no latency", [d for d in drains if not d.conditions.quota]),
    ]
    groups = [(title, members) for title, members in groups if members]
    figure, axes = plt.subplots(1, max(1, len(groups)), figsize=(6.5 * max(1, len(groups)), 4.5))
    panels: list[Axes] = list(axes) if len(groups) > 1 else [axes]
    if not groups:
        panels[0].text(0.5, 0.5, "no drain measured", ha="center", transform=panels[0].transAxes)
    for panel, (title, members) in zip(panels, groups, strict=False):
        longest = 1.0
        for drain in sorted(members, key=lambda d: -d.n):  # the shorter drains drawn on top
            seconds = [0.0, *(t for t, _ in drain.curve)]
            replies = [0, *(n for _, n in drain.curve)]
            longest = max(longest, seconds[-1])
            panel.step(seconds, replies, where="post", label=f"N={drain.n:,}")
        for quota in sorted({d.conditions.quota for d in members if d.conditions.quota}):
            ceiling = quota / 60 / UNITS_PER_REPLY
            panel.plot(
                [0, longest], [0, ceiling * longest], linestyle="--", color="grey",
                label=f"quota ceiling: {quota} / 60 / {UNITS_PER_REPLY} = {ceiling:.3f}/s",
            )  # fmt: skip
        panel.set_title(title)
        panel.set_xlabel("seconds since the process started")
        panel.set_ylabel("replies sent")
        panel.grid(alpha=0.3)
        panel.legend(loc="upper left")
    figure.suptitle("Backlog drain: billing-responder once")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def latency_plot(path: Path, latency: Latency | None) -> None:
    """A histogram of arrival-to-reply seconds, with p50, p95 and their targets."""
    figure, panel = plt.subplots(figsize=(6.5, 4.5))
    samples = latency.samples if latency is not None else []
    if latency is None or not samples:
        panel.text(0.5, 0.5, "no replies measured", ha="center", transform=panel.transAxes)
    else:
        top = max(*samples, P95_TARGET) + 0.5
        bins = [i * 0.25 for i in range(int(top / 0.25) + 2)]
        panel.hist(samples, bins=bins, color="tab:blue", alpha=0.8)
        for value, label, style in (
            (latency.p50, f"p50 {latency.p50:.2f} s", "-"),
            (latency.p95, f"p95 {latency.p95:.2f} s", "-"),
            (P50_TARGET, f"p50 target {P50_TARGET:g} s", ":"),
            (P95_TARGET, f"p95 target {P95_TARGET:g} s", ":"),
        ):
            if value is not None:
                colour = "tab:orange" if "p50" in label else "tab:red"
                panel.axvline(value, linestyle=style, color=colour, label=label)
        panel.legend()
        panel.set_title(
            f"Arrival to reply: {latency.replied} messages, one every {latency.every_seconds:g} s"
        )
    panel.yaxis.set_major_locator(MaxNLocator(integer=True))
    panel.set_xlabel("seconds from delivery to the reply's send")
    panel.set_ylabel("messages")
    panel.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
