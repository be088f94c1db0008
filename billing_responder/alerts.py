"""Telling the operator that the responder stopped working ([notify]) (stub)."""

from __future__ import annotations

from billing_responder.config import Config


def notify_operator(config: Config, *, problem: str, exit_code: int) -> None:
    """Email ``[notify] email`` and/or run ``[notify] command``; never raises."""
