"""`once --dry-run --review DIR`: a page to review a cycle's would-be replies (stub)."""

from __future__ import annotations

from pathlib import Path

from billing_responder.errors import UsageError
from billing_responder.pipeline import CycleReport, Outcome


class ReviewWriter:
    """Collects a dry-run cycle's outcomes and writes DIR/index.html plus one .eml/.html each."""

    def __init__(self, folder: Path) -> None:
        raise UsageError("--review is not built yet")

    def add(self, outcome: Outcome) -> None:
        """Record one outcome (and write its reply files, for a would-be reply)."""

    def finish(self, report: CycleReport) -> Path:
        """Write the index page; its path."""
        raise NotImplementedError
