"""The `billing-responder` command: parse arguments, load config, call the library, map errors.

Exit codes (a promise to scripts and systemd):
    0  the command did what it says (a cycle ran; deferred messages do not fail it; `check` found
       everything ready)
    1  a fatal error: a service refused us, or (`once`) stayed unreachable after retries; `run`
       waits an outage out instead (`check`: something is not ready)
    2  bad usage or a bad config: one line names the file, the key and what is wrong
    3  Gmail authorisation lost (the refresh token expired or was revoked): run
       `billing-responder auth`; systemd does not restart on it

Each command beyond the polling ones lives in its own module (``authorize``, ``checklist``,
``sample_reply``, ``history``, ``review``); this one only parses and dispatches.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from billing_responder import __version__
from billing_responder.config import (
    CONFIG_ENV_VAR,
    Config,
    SecurityConfig,
    TriageConfig,
    load_config,
    resolve_config_path,
)
from billing_responder.errors import (
    BillingResponderError,
    ConfigError,
    GmailAuthError,
    UsageError,
)
from billing_responder.logs import setup_logging
from billing_responder.mail import message_from_bytes
from billing_responder.pipeline import QUIET, WOULD_ANSWER, Outcome, triage_message
from billing_responder.triage import authentication_report

log = logging.getLogger("billing_responder")

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_AUTH_LOST = 0, 1, 2, 3
DECISIONS = ("reply", "skip", "escalate")


def build_parser() -> argparse.ArgumentParser:
    """The command line, as documented in README.md."""
    parser = argparse.ArgumentParser(
        prog="billing-responder",
        description="Answer billing emails in a Gmail inbox with a link to the sender's "
        "Stripe Billing Portal.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config file (default: ${CONFIG_ENV_VAR}, else ./config.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="override [logging] level",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="override [logging] format"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    once = commands.add_parser(
        "once", help="run one poll cycle over everything eligible, then exit"
    )
    once.add_argument(
        "--dry-run",
        action="store_true",
        help="read and decide, but send, label and mint nothing; print what would be sent",
    )
    once.add_argument(
        "--review",
        metavar="DIR",
        type=Path,
        help="with --dry-run: write each would-be reply (.eml and .html) and DIR/index.html",
    )
    run = commands.add_parser("run", help="poll on the configured interval until stopped")
    run.add_argument("--dry-run", action="store_true", help="as for `once`, on every cycle")

    explain = commands.add_parser(
        "explain", help="triage one raw .eml file offline and print the decision as JSON"
    )
    explain.add_argument("file", metavar="FILE.eml", type=Path)
    explain.add_argument(
        "--mailbox",
        metavar="ADDRESS",
        default="",
        help="the inbox's own address (mail from it is never answered)",
    )

    commands.add_parser("demo", help="run the whole pipeline against the built-in sandbox")

    auth = commands.add_parser(
        "auth", help="authorise the Gmail mailbox (OAuth) and write [gmail] token_file"
    )
    auth.add_argument(
        "--no-browser",
        action="store_true",
        help="print the URL to open instead of opening a browser (a server over an SSH tunnel)",
    )
    auth.add_argument(
        "--port",
        type=int,
        default=8765,
        help="local port Google redirects back to (default 8765; tunnel it with ssh -L)",
    )
    auth.add_argument(
        "--client-secrets",
        metavar="FILE",
        type=Path,
        help="OAuth client JSON (default: [gmail] client_secrets_file)",
    )

    commands.add_parser("check", help="go-live checklist: config, Gmail, labels, Stripe, ...")

    test_reply = commands.add_parser(
        "test-reply", help="send one real sample reply, as a customer would get it"
    )
    test_reply.add_argument("--to", metavar="ADDRESS", required=True, help="who gets it")
    test_reply.add_argument(
        "--customer", metavar="CUS_ID", required=True, help="whose portal the link opens"
    )

    history = commands.add_parser("history", help="the audit log: what happened to each email")
    history.add_argument(
        "--since",
        metavar="WHEN",
        help="only entries since then: an ISO date/time, or an age such as 2h, 3d, 1w",
    )
    history.add_argument("--decision", choices=DECISIONS, help="only entries with this decision")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    history.add_argument(
        "--full", action="store_true", help="show sender addresses in full (masked by default)"
    )
    history.add_argument(
        "--limit", type=int, default=100, metavar="N", help="at most N entries (default 100)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `billing-responder` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "explain":
            return _explain(args)
        if args.command == "demo":
            from billing_responder.sandbox.demo import run_demo  # noqa: PLC0415 - demo only

            setup_logging(args.log_level or "WARNING")
            return run_demo(sys.stdout)
        config = load_config(resolve_config_path(args.config))
        setup_logging(
            args.log_level or config.logging.level,
            mask_addresses=config.logging.mask_addresses,
            log_format=args.log_format or config.logging.format,
        )
    except (ConfigError, UsageError) as exc:
        print(f"billing-responder: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("billing-responder: interrupted", file=sys.stderr)
        return 130
    try:
        return _dispatch(config, args)
    except UsageError as exc:
        print(f"billing-responder: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        # Found only once running (the metrics port taken, the state database unusable): systemd
        # does not restart on 2, so the operator hears of it.
        print(f"billing-responder: {exc}", file=sys.stderr)
        _alert(config, args, str(exc), EXIT_USAGE)
        return EXIT_USAGE
    except GmailAuthError as exc:
        problem = f"Gmail authorisation lost: {exc}"
        # One line, what happened and the fix, so `journalctl -n 1` says all of it.
        print(f"billing-responder: {problem}; to fix it, run: billing-responder auth",
              file=sys.stderr)
        _alert(config, args, problem, EXIT_AUTH_LOST)
        return EXIT_AUTH_LOST
    except BillingResponderError as exc:  # FatalServiceError and everything else we raise
        print(f"billing-responder: {exc}", file=sys.stderr)
        _alert(config, args, str(exc), EXIT_FATAL)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("billing-responder: interrupted", file=sys.stderr)
        return 130


def _dispatch(config: Config, args: argparse.Namespace) -> int:
    # The imports are per command: `explain` and `history` must not load the API clients.
    if args.command == "once":
        if args.review is not None and not args.dry_run:
            raise UsageError("--review needs --dry-run (it shows replies instead of sending them)")
        return _once(config, dry_run=args.dry_run, review=args.review)
    if args.command == "run":
        return _run(config, dry_run=args.dry_run)
    if args.command == "auth":
        from billing_responder.authorize import run_auth  # noqa: PLC0415

        return run_auth(
            config,
            open_browser=not args.no_browser,
            port=args.port,
            client_secrets=args.client_secrets,
        )
    if args.command == "check":
        from billing_responder.checklist import run_check  # noqa: PLC0415

        return run_check(config, sys.stdout)
    if args.command == "test-reply":
        from billing_responder.sample_reply import run_test_reply  # noqa: PLC0415

        return run_test_reply(config, to=args.to, customer_id=args.customer, out=sys.stdout)
    if args.command == "history":
        from billing_responder.history import run_history  # noqa: PLC0415

        return run_history(
            config,
            since=args.since,
            decision=args.decision,
            as_json=args.json,
            full=args.full,
            limit=args.limit,
            out=sys.stdout,
        )
    raise UsageError(f"unknown command {args.command!r}")


def _alert(config: Config, args: argparse.Namespace, problem: str, exit_code: int) -> None:
    """Tell the operator, as [notify] says, that the responder stopped (polling commands only)."""
    if args.command not in ("once", "run"):
        return
    from billing_responder.alerts import notify_operator  # noqa: PLC0415

    notify_operator(config, problem=problem, exit_code=exit_code, dry_run=args.dry_run)


def _once(config: Config, *, dry_run: bool, review: Path | None = None) -> int:
    from billing_responder.service import build_service  # noqa: PLC0415 - keeps `explain` light

    on_outcome = print_dry_run_outcome if dry_run else print_outcome
    page = None
    if review is not None:
        from billing_responder.review import ReviewWriter  # noqa: PLC0415

        page = ReviewWriter(review)

        def on_outcome(outcome: Outcome) -> None:
            print_dry_run_outcome(outcome)
            page.add(outcome)

    service = build_service(config, dry_run=dry_run, serve_metrics=False)
    try:
        report = service.cycle(on_outcome=on_outcome)
    finally:
        service.close()
    print(("dry run: " if dry_run else "") + report.summary())
    if page is not None:
        print(f"review page: {page.finish(report)}")
    return EXIT_OK


def _run(config: Config, *, dry_run: bool) -> int:
    from billing_responder.daemon import Daemon  # noqa: PLC0415
    from billing_responder.service import build_service  # noqa: PLC0415

    # The daemon's stdout goes to the journal: only the dry-run review is printed; outcomes of a
    # real run are logged (with addresses masked).
    with Daemon(
        config.schedule.interval_seconds,
        on_outcome=print_dry_run_outcome if dry_run else log_outcome,
    ) as daemon:
        # An outage at start-up is waited out (Daemon.start_up); any other error ends the run.
        service = daemon.start_up(lambda: build_service(config, dry_run=dry_run))
        if service is None:
            return EXIT_OK  # told to stop during start-up: a clean stop, not a failure
        try:
            daemon.run(service.cycle)
        finally:
            service.close()
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    keywords, authserv_id = TriageConfig().keywords, SecurityConfig().authserv_id
    config_path = resolve_config_path(args.config)
    # The config is optional offline, but one the user pointed at must be valid.
    if args.config is not None or config_path.exists():
        config = load_config(config_path)
        keywords, authserv_id = config.triage.keywords, config.security.authserv_id
    try:
        raw = args.file.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    message = message_from_bytes(raw)
    decision = triage_message(message, keywords, args.mailbox, authserv_id)
    shown = decision.as_json() | {
        "authentication": authentication_report(message, (authserv_id,)).as_json()
    }
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return EXIT_OK


def print_outcome(outcome: Outcome) -> None:
    """`once`'s per-message line on stdout: what happened and why, in one line."""
    if outcome.status in QUIET:
        return
    print(_outcome_line(outcome))


def log_outcome(outcome: Outcome) -> None:
    """The daemon's per-message log line (addresses are masked by the log formatter)."""
    if outcome.status not in QUIET:
        log.info("%s", _outcome_line(outcome))


def _outcome_line(outcome: Outcome) -> str:
    decision = outcome.decision
    detail = outcome.error or ("; ".join(decision.reasons) if decision else "")
    target = f" to {outcome.recipient}" if outcome.recipient else ""
    return f"{outcome.status.value:<15} {outcome.ref.id}{target}  {detail}".rstrip()


def print_dry_run_outcome(outcome: Outcome) -> None:
    """The dry-run review: the full reply for what would be answered, reasons for the rest."""
    if outcome.status in QUIET:
        return
    decision = outcome.decision
    print(f"=== message {outcome.ref.id} (thread {outcome.ref.thread_id}): "
          f"{outcome.status.value.upper()}")
    if decision is not None:
        if decision.sender:
            print(f"From:     {decision.sender}")
        print(f"Subject:  {decision.subject}")
    if outcome.status in WOULD_ANSWER:
        print(f"Customer: {outcome.customer_id}")
        print(f"Reply to: {outcome.recipient}")
        print(f"Reply subject: {outcome.reply_subject}")
        print("--- reply text " + "-" * 50)
        print((outcome.dry_run_text or "").rstrip())
        print("-" * 65)
    elif outcome.error:
        print(f"Error:    {outcome.error}")
    elif decision is not None:
        for reason in decision.reasons:
            print(f"  - {reason}")
    print()
