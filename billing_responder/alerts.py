"""Telling the operator that the responder stopped working (``[notify]``).

When `once` or `run` ends with exit 1 (a fatal error), 3 (Gmail authorisation lost) or 2 (a
config problem found only once running, such as the metrics port in use), the CLI
calls :func:`notify_operator`, which tries both channels the config names, each on its own:

- ``[notify] command``: run as an argv list (no shell), with ``BILLING_RESPONDER_PROBLEM`` and
  ``BILLING_RESPONDER_EXIT_CODE`` added to the environment, for at most 30 seconds. This is the
  channel that still works when Gmail does not (a revoked refresh token).
- ``[notify] email``: a short plain-text message sent through the mailbox itself, so it only
  arrives when Gmail still works for sending (a Stripe key refused; a service account). It is
  marked ``Auto-Submitted: auto-generated`` and carries one of our Message-IDs, so no responder
  (this one included, should the address be the support inbox) answers it.

Neither channel may stop the exit code from reaching systemd: failures are logged, never raised.
What is sent is the problem line the CLI printed and what to do; the problem is scrubbed of
anything shaped like a key, token or portal link first, in case an error message ever quoted one.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from datetime import UTC, datetime
from email.message import EmailMessage

from billing_responder.config import STRIPE_KEY_ENV_VAR, Config
from billing_responder.errors import BillingResponderError
from billing_responder.mail import (
    REPLY_POLICY,
    header_text,
    new_message_id,
    reply_message_id_domain,
)

log = logging.getLogger(__name__)

PROBLEM_ENV_VAR = "BILLING_RESPONDER_PROBLEM"
EXIT_CODE_ENV_VAR = "BILLING_RESPONDER_EXIT_CODE"
COMMAND_TIMEOUT_SECONDS = 30.0
_WITHHELD_FROM_HOOK = frozenset(
    {STRIPE_KEY_ENV_VAR, "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
)
#: What each exit code means to the operator: the subject's ending and the fix.
_MEANING = {
    3: (
        "Gmail authorisation lost",
        "To fix it, authorise the mailbox again on {host}: billing-responder auth\n"
        "(then start the service again: systemctl start billing-responder).",
    ),
    2: (
        "a configuration problem",
        "Fix the setting named above in the config on {host}, then start the service again "
        "(systemctl start billing-responder); systemd does not restart it on its own.",
    ),
    1: (
        "a fatal error",
        "Look at the log on {host} (journalctl -u billing-responder) and fix what it names. "
        "systemd retries the service after a pause, and gives up after five failed starts in "
        "30 minutes (then: systemctl reset-failed billing-responder; systemctl start "
        "billing-responder).",
    ),
}
# Stripe keys, Google access and refresh tokens, Billing Portal session links.
_SECRET_SHAPES = re.compile(
    r"(?:sk|rk|pk)_(?:test|live)_[A-Za-z0-9]+"
    r"|ya29\.[\w.-]+"
    r"|1//[\w.-]+"
    r"|https?://billing\.stripe\.com/\S*"
)


def notify_operator(
    config: Config, *, problem: str, exit_code: int, dry_run: bool = False
) -> None:
    """Email ``[notify] email`` and/or run ``[notify] command``; never raises.

    A dry run mails nothing (it promises to send nothing through Gmail); the command still runs.
    """
    notify = config.notify
    if not notify.command and not notify.email:
        return
    problem = scrub(problem)
    if notify.command:
        try:
            _run_command(notify.command, problem, exit_code)
        except Exception as exc:  # a notification must never change the exit code
            log.error("[notify] command failed unexpectedly: %s: %s", type(exc).__name__, exc)
    if notify.email and dry_run:
        log.warning("[notify] dry run: no notice mailed to [notify] email; the problem is above")
    elif notify.email:
        try:
            _send_email(config, problem, exit_code)
        except Exception as exc:  # as above
            log.error("[notify] email failed unexpectedly: %s: %s", type(exc).__name__, exc)


def scrub(text: str) -> str:
    """``text`` with anything shaped like a key, a token or a portal link made ``[redacted]``."""
    return _SECRET_SHAPES.sub("[redacted]", text)


def alert_message(
    problem: str, exit_code: int, *, to: str, host: str, config_path: str, now: datetime
) -> EmailMessage:
    """The plain-text message to the operator (pure: no I/O)."""
    ending, fix = _MEANING.get(exit_code, _MEANING[1])
    message = EmailMessage(policy=REPLY_POLICY)
    message["To"] = to
    message["Subject"] = f"billing-responder stopped: {ending}"
    message["Date"] = now
    message["Message-ID"] = new_message_id(reply_message_id_domain(to))
    # RFC 3834: machine-made, not a reply; responders (ours included) leave it alone.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Auto-Response-Suppress"] = "All"
    message.set_content(
        f"billing-responder on {host} stopped at {now:%Y-%m-%d %H:%M:%S %Z} "
        f"(exit code {exit_code}).\n\n"
        f"Problem: {header_text(problem)}\n\n"
        f"{fix.format(host=host)}\n\n"
        f"Config: {config_path}\n"
        "This message was sent automatically; replies to it are not read.\n"
    )
    return message


def _run_command(command: tuple[str, ...], problem: str, exit_code: int) -> None:
    # The hook gets what it needs to say what happened, and neither the Stripe key our own
    # environment may hold nor the way to systemd's copy of it; nor may it speak for us to
    # systemd (READY, WATCHDOG).
    env = {k: v for k, v in os.environ.items() if k not in _WITHHELD_FROM_HOOK}
    env[PROBLEM_ENV_VAR] = problem
    env[EXIT_CODE_ENV_VAR] = str(exit_code)
    try:
        done = subprocess.run(  # noqa: S603 - the operator's own command, as an argv list
            list(command),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning(
            "[notify] command %s did not finish within %g s and was killed",
            command[0], COMMAND_TIMEOUT_SECONDS,
        )
        return
    except OSError as exc:
        log.warning("[notify] command %s could not be started: %s", command[0], exc.strerror or exc)
        return
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip().splitlines()
        log.warning(
            "[notify] command %s exited %d%s",
            command[0], done.returncode, f": {said[-1]}" if said else "",
        )
        return
    log.info("[notify] command %s told the operator", command[0])


def _send_email(config: Config, problem: str, exit_code: int) -> None:
    # Imported here: the CLI loads this module on every failure, the Gmail client only if needed.
    from billing_responder.gmail import GmailMailbox, load_credentials  # noqa: PLC0415

    message = alert_message(
        problem,
        exit_code,
        to=config.notify.email,
        host=socket.gethostname(),
        config_path=str(config.path),
        now=datetime.now(UTC),
    )
    otherwise = (
        "relying on the [notify] command"
        if config.notify.command
        else "set [notify] command for a channel that does not depend on Gmail"
    )
    try:
        mailbox = GmailMailbox(config.gmail, load_credentials(config.gmail))
        try:
            mailbox.send(message.as_bytes(), None)
        finally:
            mailbox.close()
    except BillingResponderError as exc:
        log.warning(
            "[notify] cannot email %s through the mailbox (%s); %s",
            config.notify.email, exc, otherwise,
        )
        return
    log.info("[notify] emailed %s", config.notify.email)
