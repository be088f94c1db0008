"""Where the real adapters are chosen: config in, a ready :class:`Responder` out."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from billing_responder.billing import StripeBilling, key_mode
from billing_responder.config import Config, stripe_api_key
from billing_responder.errors import ConfigError, FatalServiceError, StateError
from billing_responder.gmail import GmailMailbox, load_credentials
from billing_responder.governor import (
    STRIPE_LIMITS,
    TokenBucket,
    gmail_governor,
    stripe_governor,
)
from billing_responder.ledger import SqliteLedger
from billing_responder.metrics import Metrics, start_metrics
from billing_responder.pipeline import CycleReport, Outcome, Responder, Settings
from billing_responder.render import ReplyRenderer

log = logging.getLogger(__name__)


@dataclass
class Service:
    """A responder wired to the real Gmail, Stripe and SQLite, plus what owns their resources."""

    responder: Responder
    mailbox: GmailMailbox
    billing: StripeBilling
    ledger: SqliteLedger
    metrics: Metrics = field(default_factory=Metrics)

    def cycle(
        self,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_outcome: Callable[[Outcome], None] = lambda outcome: None,
    ) -> CycleReport:
        """One poll cycle; a refreshed Gmail access token is written back afterwards."""

        def observed(outcome: Outcome) -> None:
            self.metrics.outcome(outcome)
            on_outcome(outcome)

        started, succeeded = time.monotonic(), False
        try:
            report = self.responder.cycle(should_stop=should_stop, on_outcome=observed)
            succeeded = True
            self.metrics.send_caps(report.send_caps())
            return report
        except FatalServiceError as exc:
            self.metrics.fatal_error(exc.service)
            raise
        finally:
            self.metrics.cycle_finished(time.monotonic() - started, succeeded=succeeded)
            if not self.responder.dry_run:
                self.mailbox.persist_refreshed_token()

    def close(self) -> None:
        """Release the connections, the database and the metrics endpoint, each whatever the
        others do (the first error is raised after all were tried)."""
        with contextlib.ExitStack() as stack:
            for resource in (
                self.metrics, self.ledger, self.billing, self.mailbox, self.responder
            ):
                stack.callback(resource.close)  # in reverse: the workers finish, then the rest


def open_billing(config: Config, api_key: str, *, governed: bool = False) -> StripeBilling:
    """Stripe as ``[stripe]`` says (the commands beside the daemon use it too); ``governed``: kept
    under Stripe's rate limits for the key's mode, shared by every worker (see governor.py)."""
    limits: dict[str, TokenBucket] = {}
    if governed:
        per_second = config.stripe.requests_per_second or STRIPE_LIMITS[key_mode(api_key)]
        limits["governor"] = stripe_governor(per_second)
        limits["search_governor"] = stripe_governor(config.stripe.search_requests_per_second)
    return StripeBilling(
        api_key,
        api_base=config.stripe.api_base,
        return_url=config.stripe.return_url,
        portal_configuration=config.stripe.portal_configuration,
        locale=config.stripe.locale,
        timeout_seconds=config.stripe.timeout_seconds,
        **limits,
    )


def build_service(config: Config, *, dry_run: bool, serve_metrics: bool = True) -> Service:
    """Build the responder from ``config`` and check both services once.

    ``serve_metrics=False`` leaves ``[metrics] listen`` alone: a one-off cycle (``once``) beside
    the running daemon must not fight it for the port, and one cycle's counts are no series."""
    api_key = stripe_api_key(config)
    renderer = ReplyRenderer(config.reply.templates_dir, config_path=str(config.path))
    credentials = load_credentials(config.gmail)
    # Before any service is called: a port in use fails the start at once, with nothing done.
    with contextlib.ExitStack() as opened:  # closes what was opened if a later step fails
        metrics = start_metrics(config) if serve_metrics else Metrics()
        opened.callback(metrics.close)
        mailbox = GmailMailbox(
            config.gmail,
            credentials,
            on_quota=metrics.gmail_quota,
            governor=gmail_governor(config.gmail.quota_units_per_minute),
        )
        opened.callback(mailbox.close)
        billing = open_billing(config, api_key, governed=True)
        opened.callback(billing.close)
        try:
            ledger = SqliteLedger(config.state.database, read_only=dry_run)
        except StateError as exc:
            raise ConfigError(str(config.path), "state.database", str(exc)) from None
        opened.pop_all()  # from here on, Service.close owns them
    responder = Responder(
        mailbox, billing, ledger, renderer, Settings.from_config(config), dry_run=dry_run
    )
    service = Service(responder, mailbox, billing, ledger, metrics)
    try:
        responder.start()
    except BaseException:
        service.close()
        raise
    log.info(
        "answering billing mail for %s; Stripe key mode: %s%s",
        responder.address,
        key_mode(api_key),
        " (dry run: nothing will be sent or changed)" if dry_run else "",
    )
    return service
