"""The way of one message, top to bottom: fetch, triage, look up, mint, render, send, label, record.

:meth:`Responder.handle` is the whole story of one email and the place to read first. Deciding is
pure (``triage.decide``, ``customers.choose_customer``, rendering); doing happens through the
``Mailbox``, ``Billing`` and ``Ledger`` ports. A dry run is the same path with the writes left
out: no send, no label, no portal session, no ledger row — only an :class:`Outcome` saying what
would have happened. With ``[reply] mode = "draft"`` the reply is left as a Gmail draft in the
thread for a person to send, instead of sent; the ledger treats it exactly as a sent reply.

Failure rules: a ``TransientServiceError`` while handling one message defers that message (it stays
unanswered and unmarked for the next cycle); a ``FatalServiceError`` stops the cycle.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from billing_responder import mail, triage
from billing_responder.config import Config
from billing_responder.customers import choose_customer
from billing_responder.errors import (
    FatalServiceError,
    HistoryExpiredError,
    IdempotencyConflictError,
    MessageGoneError,
    TransientServiceError,
)
from billing_responder.limits import (
    Limits,
    SendCap,
    next_attempt,
    send_cap,
    sender_blocked,
    too_old,
)
from billing_responder.model import (
    DONE,
    SENDING,
    SENT,
    Action,
    Decision,
    IncomingMessage,
    LedgerEntry,
    MailboxChange,
    MessageRef,
    PortalSession,
)
from billing_responder.ports import Billing, Ledger, Mailbox
from billing_responder.render import ReplyContext, ReplyRenderer
from billing_responder.workers import Claims, WorkerPool

log = logging.getLogger(__name__)

#: What a dry run puts where the portal link would go: obviously fake, never a working link.
DRY_RUN_PORTAL_URL = "https://billing.stripe.com/p/session/DRY-RUN-NO-SESSION-CREATED"
UNREAD = "UNREAD"


class Status(enum.Enum):
    """What became of one message in a cycle."""

    REPLIED = "replied"
    WOULD_REPLY = "would reply"
    DRAFTED = "drafted"  # [reply] mode = "draft": the reply waits in the thread for a person
    WOULD_DRAFT = "would draft"
    SKIPPED = "skipped"
    ESCALATED = "escalated"
    WOULD_ESCALATE = "would escalate"
    DEFERRED = "deferred"
    WAITING = "waiting to retry"
    ALREADY_HANDLED = "already handled"


#: Outcomes that say nothing new about a message: not reported every cycle.
QUIET = frozenset({Status.ALREADY_HANDLED, Status.WAITING})

#: Outcomes that leave a message for a later cycle (the next cycle then searches the mailbox):
#: every one but those that finish a message, so a new kind of "not yet" can never lose mail.
LEFT_FOR_LATER = frozenset(Status) - {
    Status.REPLIED, Status.WOULD_REPLY, Status.DRAFTED, Status.WOULD_DRAFT, Status.SKIPPED,
    Status.ESCALATED, Status.WOULD_ESCALATE, Status.ALREADY_HANDLED,
}

#: Outcomes where the customer's reply now exists: sent, or drafted for a person to send.
ANSWERED = frozenset({Status.REPLIED, Status.DRAFTED})
#: The dry-run outcomes that carry a whole would-be reply.
WOULD_ANSWER = frozenset({Status.WOULD_REPLY, Status.WOULD_DRAFT})


@dataclass(frozen=True)
class Outcome:
    """What happened to one message, for the operator's eyes (never holds a real portal URL)."""

    ref: MessageRef
    status: Status
    decision: Decision | None = None
    customer_id: str | None = None
    recipient: str | None = None
    reply_subject: str | None = None
    dry_run_text: str | None = None  # the rendered reply, in a dry run only
    #: The whole reply as it would be sent (RFC 5322 bytes; the portal link is the dry-run
    #: placeholder) and its HTML part, in a dry run only: for the review page.
    dry_run_message: bytes | None = None
    dry_run_html: str | None = None
    error: str | None = None
    #: When Gmail received the message (ms since the epoch), where it was fetched: for the
    #: arrival-to-reply latency, and to list a cycle's outcomes in arrival order.
    received_ms: int | None = None
    #: The ceiling on replies that made this an escalation: "hour" (the circuit breaker) or
    #: "day" (the daily send cap); None when no ceiling was met.
    send_cap: str | None = None


@dataclass(frozen=True)
class _Candidate:
    """A message a cycle looks at; ``subject_unchecked`` when the history, not the search, listed
    it (its subject is then checked before anything else)."""

    ref: MessageRef
    subject_unchecked: bool = False


@dataclass
class CycleReport:
    """Counts of one cycle's outcomes."""

    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: Status) -> int:
        """How many messages ended with ``status``."""
        return sum(1 for o in self.outcomes if o.status is status)

    def send_caps(self) -> frozenset[str]:
        """The ceilings on replies met in this cycle: "hour", "day", or none."""
        return frozenset(o.send_cap for o in self.outcomes if o.send_cap is not None)

    def summary(self) -> str:
        """One line, e.g. ``3 messages: 1 replied, 2 skipped``."""
        parts = [f"{self.count(s)} {s.value}" for s in Status if self.count(s)]
        total = len(self.outcomes)
        noun = "message" if total == 1 else "messages"
        return f"{total} {noun}" + (": " + ", ".join(parts) if parts else "")


@dataclass(frozen=True)
class Settings:
    """What the pipeline needs from the configuration."""

    keywords: tuple[str, ...]
    replied_label: str
    needs_human_label: str
    mark_read: bool
    signature: str
    from_name: str
    authserv_id: str = "mx.google.com"
    limits: Limits = field(default_factory=Limits)
    #: "send" the reply, or "draft" it in the thread for a person to check and send.
    reply_mode: str = "send"
    drafted_label: str = "billing-responder/drafted"
    #: Messages handled at the same time ([concurrency] workers).
    workers: int = 1

    @property
    def drafting(self) -> bool:
        """Whether replies are left as drafts rather than sent."""
        return self.reply_mode == "draft"

    @property
    def answered_label(self) -> str:
        """The label a message gets once its reply exists (sent, or drafted)."""
        return self.drafted_label if self.drafting else self.replied_label

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        """The pipeline's slice of the whole configuration."""
        return cls(
            keywords=config.triage.keywords,
            replied_label=config.labels.replied,
            needs_human_label=config.labels.needs_human,
            mark_read=config.reply.mark_read,
            signature=config.reply.signature,
            from_name=config.reply.from_name,
            authserv_id=config.security.authserv_id,
            reply_mode=config.reply.mode,
            drafted_label=config.labels.drafted,
            workers=config.concurrency.workers,
            limits=Limits(
                max_age_days=config.triage.max_age_days,
                per_sender_hours=config.limits.per_sender_hours,
                max_replies_per_hour=config.limits.max_replies_per_hour,
                max_attempts=config.limits.max_attempts,
                max_sends_per_day=config.limits.max_sends_per_day,
            ),
        )


def candidate_query(settings: Settings) -> str:
    """The Gmail search that pre-filters candidates; triage re-checks everything on the message.

    Example: ``is:unread in:inbox subject:(invoice OR billing) -label:billing-responder-replied``.
    """
    words = " OR ".join(f'"{k}"' if " " in k else k for k in settings.keywords)
    # Every label that says "handled", whichever mode is on now: a thread drafted before the
    # switch to sending (or the other way round) has its reply already.
    labels = (settings.replied_label, settings.needs_human_label, settings.drafted_label)
    excluded = " ".join(f"-label:{_search_label(name)}" for name in labels)
    return f"is:unread in:inbox subject:({words}) {excluded}"


def _search_label(name: str) -> str:
    # Gmail search spells "/" and spaces in label names as "-".
    return name.replace("/", "-").replace(" ", "-").lower()


class Responder:
    """Answers billing emails: one :meth:`cycle` at a time, one :meth:`handle` per message."""

    def __init__(
        self,
        mailbox: Mailbox,
        billing: Billing,
        ledger: Ledger,
        renderer: ReplyRenderer,
        settings: Settings,
        *,
        dry_run: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.clock = clock
        self.mailbox = mailbox
        self.billing = billing
        self.ledger = ledger
        self.renderer = renderer
        self.settings = settings
        self.dry_run = dry_run
        self.address = ""
        self._policy: triage.TriagePolicy | None = None
        self._pool = WorkerPool(settings.workers)
        self._claims = Claims()
        self._admitting = threading.Lock()

    def start(self) -> None:
        """Check both services and the templates once; make sure the labels exist (unless dry)."""
        # Stripe is checked while Gmail is asked (start-up time is the sum of the round trips),
        # and before the labels: a wrong key must stop the start before anything is written.
        with ThreadPoolExecutor(1, thread_name_prefix="start") as beside:
            stripe_checked = beside.submit(self.billing.verify)
            self.address = self.mailbox.address()
            send_as = self.mailbox.send_as_addresses()
            stripe_checked.result()
        self.renderer.check()
        names = [self.settings.answered_label, self.settings.needs_human_label]
        labels = self.mailbox.label_ids(names, create=not self.dry_run)
        missing = [name for name, label_id in labels.items() if label_id is None]
        if missing:
            log.info("dry run: would create the labels %s", ", ".join(missing))
        aliases = [a for a in send_as if a.lower() != self.address.lower()]
        self._policy = triage.TriagePolicy(
            keywords=self.settings.keywords,
            mailbox_address=self.address,
            aliases=tuple(aliases),
            trusted_authserv_ids=(self.settings.authserv_id,),
        )

    def close(self) -> None:
        """Let the worker threads end."""
        self._pool.close()

    def cycle(
        self,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_outcome: Callable[[Outcome], None] = lambda outcome: None,
    ) -> CycleReport:
        """Handle every candidate message now in the mailbox, ``[concurrency] workers`` at a time.

        Candidates come from what changed since the last complete cycle (see :meth:`_candidates`);
        replies an earlier run left unfinished come first. The history id reached is stored only
        after every candidate was handled, so a crash or a stop replays that window rather than
        skipping it. Outcomes are reported on this thread as the messages finish.
        """
        if self._policy is None:
            self.start()
        report = CycleReport()
        listed, reached = self._candidates()
        unfinished = self._unfinished()
        again = {c.ref.id for c in unfinished}

        def finished(outcome: Outcome | None) -> None:
            if outcome is not None:
                report.outcomes.append(outcome)
                on_outcome(outcome)

        # The unfinished first, and apart: until a reply in doubt is resolved, other mail from
        # that sender or in that thread would only be deferred again.
        done = all(
            self._pool.run(
                batch, self._handle_candidate, should_stop=should_stop, on_result=finished
            )
            for batch in (unfinished, (c for c in listed if c.ref.id not in again))
        )
        capped = [o for o in report.outcomes if o.send_cap is not None]
        if capped:
            reason = capped[-1].decision.reasons[-1] if capped[-1].decision else "a ceiling"
            log.warning(
                "%d billing email(s) went to a person instead of being answered: %s",
                len(capped), reason,
            )
        if not done:
            log.info("stopping: the candidates not started wait for the next cycle")
            return report
        self._remember_history(reached, report)
        return report

    # -- where candidates come from ---------------------------------------------------------------

    def _candidates(self) -> tuple[Iterable[_Candidate], int | None]:
        """This cycle's candidates and the history id they bring us to.

        Incremental: the messages added or relabelled since the stored history id that may be
        candidates now (one users.history.list call, 2 quota units, when nothing happened).
        A full search sync instead when there is nothing to start from — the first cycle, a dry
        run, the cycle after one that left messages for later (they arrived in a window already
        passed), or a history id Gmail no longer keeps (a long downtime). Its history id is read
        *before* the listing, so mail arriving during the listing is in the next window.

        The search is read page by page as the workers take its messages (Gmail lists newest
        first, 500 a page), each page oldest first: a backlog of up to a page is answered in
        arrival order, and no more than one page of ids is held, however long the backlog.
        """
        start = None if self.dry_run else self.ledger.history_id()
        if start is not None:
            try:
                changes, reached = self.mailbox.changes_since(start)
            except HistoryExpiredError:
                log.warning(
                    "full sync: Gmail's history no longer reaches back to id %d (it expired while"
                    " the responder was not running); searching the mailbox for everything waiting",
                    start,
                )
            else:
                return self._still_candidates(changes), reached
        else:
            log.debug("full sync: no history id stored (first cycle, dry run, or mail left over)")
        listed_from = None if self.dry_run else self.mailbox.history_id()
        pages = self.mailbox.candidate_pages(candidate_query(self.settings))
        listing = (_Candidate(ref) for page in pages for ref in reversed(page))
        return listing, listed_from

    def _unfinished(self) -> list[_Candidate]:
        """Replies an earlier run began but did not finish, which this cycle may not list.

        A run killed after labelling, but before recording it, leaves a message no search or
        history window brings back (it carries our label now): its row is resolved from here.
        """
        if self.dry_run:
            return []
        return [
            _Candidate(MessageRef(entry.gmail_id, entry.thread_id))
            for entry in self.ledger.unfinished()
        ]

    def _still_candidates(self, changes: list[MailboxChange]) -> list[_Candidate]:
        """The changed messages the candidate search may list now.

        The labels in the history rule out, without a request, what the search excludes: read,
        archived, spam or trash, or labelled by us (our own replies and labels are in the history
        too). The rest still need their subject checked as the search would (see
        :meth:`_handle`), so both ways of polling handle, report and record the same messages.
        """
        settings = self.settings
        handled = {
            "SPAM", "TRASH", settings.replied_label, settings.needs_human_label,
            settings.drafted_label,
        }
        return [
            _Candidate(change.ref, subject_unchecked=True)
            for change in changes
            if change.labels is None
            or ({UNREAD, "INBOX"} <= change.labels and not change.labels & handled)
        ]

    def _remember_history(self, reached: int | None, report: CycleReport) -> None:
        """Store where the next cycle starts, or forget it when messages were left for later.

        A deferred or waiting message is in a history window already passed, so no later window
        would bring it back: the next cycle is a full search sync instead, which finds whatever
        is still waiting, in whichever window it arrived.
        """
        if self.dry_run or reached is None:
            return
        left = sum(1 for o in report.outcomes if o.status in LEFT_FOR_LATER)
        if left:
            log.info("%d message(s) left for later: the next cycle searches the mailbox", left)
            self.ledger.record_history_id(None)
        else:
            self.ledger.record_history_id(reached)

    # -- the way of one message -------------------------------------------------------------------

    def handle(self, ref: MessageRef) -> Outcome:
        """Everything that happens to one message; a failure defers it to the next cycle."""
        outcome = self._handle_candidate(_Candidate(ref))
        assert outcome is not None  # only a candidate whose subject is unchecked can be no one's
        return outcome

    def _handle_candidate(self, candidate: _Candidate) -> Outcome | None:
        """:meth:`handle`, on a worker; None for a message that turned out to be no candidate.

        One worker at a time holds a thread: a second message in it waits, then sees the reply
        the first one got (or is resuming) and is skipped, as it would be one after the other.
        """
        ref = candidate.ref
        with self._claims.hold(f"thread {ref.thread_id}"):
            try:
                return self._handle(ref, subject_unchecked=candidate.subject_unchecked)
            except TransientServiceError as exc:
                return self._defer(ref, str(exc))
            except FatalServiceError:
                raise
            except Exception as exc:
                # A bug met by one odd message must cost that message a cycle, not stop every
                # cycle at the same message with all newer mail waiting behind it.
                log.exception("message %s: unexpected error", ref.id)
                return self._defer(ref, f"internal error: {type(exc).__name__}: {exc}")

    def _handle(self, ref: MessageRef, *, subject_unchecked: bool = False) -> Outcome | None:
        entry = self.ledger.get(ref.id)
        now = self.clock()
        if entry is None and subject_unchecked:
            # Listed by the history, not by the search: check its subject as the search would.
            # One that is no candidate is not reported or recorded, like one the search leaves
            # out; one deleted meanwhile (404) is gone, not deferred.
            try:
                message = self.mailbox.fetch(ref)
            except MessageGoneError:
                log.info("message %s is gone from the mailbox (404); skipped", ref.id)
                return None
            subject = mail.decode_header_value(message.get("Subject") or "")
            if triage.matching_keyword(subject, self.settings.keywords) is None:
                return None
        else:
            if entry is not None and entry.state == DONE:
                return Outcome(ref, Status.ALREADY_HANDLED)
            if entry is not None and entry.failures and not self.dry_run:
                retry_at = next_attempt(datetime.fromisoformat(entry.updated_at), entry.failures)
                if now < retry_at:
                    return Outcome(ref, Status.WAITING, error=entry.last_error)
            if entry is not None and entry.state in (SENDING, SENT) and not self.dry_run:
                resumed = self._resume(ref, entry)
                if resumed is not None:
                    return resumed
            message = self.mailbox.fetch(ref)
        outcome = self._decide(ref, entry, message, now)
        if outcome.received_ms is None and message.internal_date_ms:
            outcome = replace(outcome, received_ms=message.internal_date_ms)
        return outcome

    def _decide(
        self, ref: MessageRef, entry: LedgerEntry | None, message: IncomingMessage, now: datetime
    ) -> Outcome:
        decision = triage.decide(message, self._triage_policy())
        decision = self._too_old(decision, message, now)
        if decision.action is Action.SKIP:
            return self._skip(ref, decision)
        if decision.action is Action.ESCALATE or decision.sender is None:
            return self._escalate(ref, decision)
        # One worker at a time answers a sender, so the per-sender limit sees every reply.
        with self._claims.hold(f"sender {decision.sender.lower()}"):
            return self._answer(ref, entry, message, decision, now)

    def _answer(
        self,
        ref: MessageRef,
        entry: LedgerEntry | None,
        message: IncomingMessage,
        decision: Decision,
        now: datetime,
    ) -> Outcome:
        """Look up the customer, mint the session, render and send (or draft) the reply."""
        sender = decision.sender
        assert sender is not None
        if self.ledger.reply_in_doubt(sender, message.thread_id, message.id):
            # Wait until that send is resolved rather than risk a second reply.
            raise TransientServiceError(
                "ledger", "another reply to this sender or thread is not resolved yet"
            )
        blocked = sender_blocked(self.ledger, sender, message.thread_id, now, self.settings.limits)
        if blocked is not None:
            return self._skip(ref, _with_reason(decision, *blocked))

        customer = choose_customer(self.billing.find_customers(sender), sender)
        if customer is None:
            reason = "no Stripe customer has this sender's address"
            return self._escalate(ref, _with_reason(decision, Action.ESCALATE, reason))
        decision = _with_reason(decision, Action.REPLY, f"Stripe customer {customer.id}")

        # The reply's own Message-ID names this attempt in the ledger, in the idempotency key and
        # in the mailbox; it is recorded before anything is minted or sent. An interrupted attempt
        # that sent nothing is taken up again under its own id, so Stripe replays its session.
        resumed_id = entry.reply_message_id if entry and entry.state == SENDING else None
        reply_id = resumed_id or self._new_reply_id()
        if resumed_id is None:
            cap = self._admit(ref, decision, customer.id, reply_id, now)
            if cap is not None:
                escalated = self._escalate(ref, _with_reason(decision, Action.ESCALATE, cap.reason))
                return replace(escalated, send_cap=cap.window)
        elif not self.dry_run:
            # Admitted before, and still counted under the ceilings; the choice of customer is
            # brought up to date.
            self.ledger.record_intent(
                ref.id, ref.thread_id, decision, customer_id=customer.id, reply_message_id=reply_id
            )
        if self.dry_run:
            portal_url = DRY_RUN_PORTAL_URL
        else:
            try:
                session = self._mint(ref, customer.id, reply_id)
            except IdempotencyConflictError:
                # The key was first used for another choice (say, a newer customer record):
                # what the interrupted attempt minted is not what is needed now. The new attempt
                # takes the old one's place (and its place under the ceilings).
                reply_id = self._new_reply_id()
                self.ledger.record_intent(
                    ref.id, ref.thread_id, decision,
                    customer_id=customer.id, reply_message_id=reply_id,
                )
                session = self._mint(ref, customer.id, reply_id)
            portal_url = session.url

        # The whole subject, not the shortened one the decision shows: Gmail threads a reply
        # only when its subject matches the original's.
        subject = mail.decode_header_value(message.get("Subject") or "")
        rendered = self.renderer.render(
            ReplyContext(
                customer_name=customer.name or "",
                portal_url=portal_url,
                original_subject=subject,
                signature=self.settings.signature,
            )
        )
        reply, _ = mail.build_reply(
            message,
            from_address=self.address,
            from_name=self.settings.from_name or None,
            to=sender,
            subject=subject,
            text=rendered.text,
            html=rendered.html,
            message_id_domain=mail.reply_message_id_domain(self.address),
            message_id=reply_id,
        )
        if self.dry_run:
            return Outcome(
                ref, Status.WOULD_DRAFT if self.settings.drafting else Status.WOULD_REPLY,
                decision, customer.id, sender, str(reply["Subject"]),
                dry_run_text=rendered.text,
                dry_run_message=bytes(reply),
                dry_run_html=rendered.html,
            )

        self._deliver(ref, bytes(reply), sender, customer.id)
        return Outcome(
            ref, self._answered_status(), decision, customer.id, sender, str(reply["Subject"]),
            received_ms=message.internal_date_ms or None,
        )

    def _deliver(self, ref: MessageRef, raw: bytes, sender: str, customer_id: str) -> None:
        """Send the reply, or leave it as a draft in the thread; record it; label the message.

        A draft is the reply as far as the ledger knows: recorded, resumed and counted by the
        limits exactly like a sent one, so no second draft (nor a send) ever follows it.
        """
        if self.settings.drafting:
            sent_id = self.mailbox.create_draft(raw, ref.thread_id)
        else:
            sent_id = self.mailbox.send(raw, ref.thread_id)
        self.ledger.record_sent(ref.id, sent_id, drafted=self.settings.drafting)
        self._label_replied(ref)
        if self.settings.drafting:
            log.info(
                "drafted a reply to %s (%s) in thread %s with a portal link for %s, for a person"
                " to send",
                sender, ref.id, ref.thread_id, customer_id,
            )
        else:
            log.info(
                "replied to %s (%s) in thread %s with a portal link for %s",
                sender, ref.id, ref.thread_id, customer_id,
            )

    def _too_old(self, decision: Decision, message: IncomingMessage, now: datetime) -> Decision:
        """Triage's decision, turned into a skip when the message is too old to answer."""
        if decision.action is not Action.SKIP and message.internal_date_ms:
            received = datetime.fromtimestamp(message.internal_date_ms / 1000, UTC)
            old = too_old(received, now, self.settings.limits)
            if old is not None:
                return _with_reason(decision, Action.SKIP, old)
        return decision

    def _admit(
        self, ref: MessageRef, decision: Decision, customer_id: str, reply_id: str, now: datetime
    ) -> SendCap | None:
        """Let one more reply under the breaker and the daily cap, and record its intent, as one
        step: workers answering at the same time cannot all slip under the same ceiling. The
        ceiling met instead, if any (then nothing is recorded)."""
        with self._admitting:
            cap = send_cap(self.ledger, now, self.settings.limits)
            if cap is None and not self.dry_run:
                self.ledger.record_intent(
                    ref.id, ref.thread_id, decision,
                    customer_id=customer_id, reply_message_id=reply_id,
                )
            return cap

    def _new_reply_id(self) -> str:
        return mail.new_message_id(mail.reply_message_id_domain(self.address))

    def _mint(self, ref: MessageRef, customer_id: str, reply_id: str) -> PortalSession:
        """Mint the portal session of a recorded intent (once per attempt, whatever retries)."""
        attempt = hashlib.sha256(reply_id.encode()).hexdigest()[:16]
        session = self.billing.create_portal_session(
            customer_id, idempotency_key=f"billing-responder-{ref.id}-{attempt}"
        )
        self.ledger.record_session(ref.id, session.id)
        return session

    def _resume(self, ref: MessageRef, entry: LedgerEntry) -> Outcome | None:
        """Finish a reply an earlier attempt sent; None when none went out (the caller resumes)."""
        if entry.state == SENDING:
            sent_id = self.mailbox.find_sent_reply(ref.thread_id, entry.reply_message_id or "")
            if sent_id is None:
                log.info("message %s: the interrupted attempt sent nothing; resuming it", ref.id)
                return None
            # Made in the mode of that attempt; a mode changed in between is not told apart.
            self.ledger.record_sent(ref.id, sent_id, drafted=self.settings.drafting)
        self._label_replied(ref)
        log.info("message %s: finished the reply an earlier attempt had sent (or drafted)", ref.id)
        decision = Decision(Action.REPLY, entry.reasons, entry.sender, entry.subject)
        return Outcome(ref, self._answered_status(), decision, entry.customer_id, entry.sender)

    def _answered_status(self) -> Status:
        return Status.DRAFTED if self.settings.drafting else Status.REPLIED

    def _label_replied(self, ref: MessageRef) -> None:
        remove = [UNREAD] if self.settings.mark_read else []
        self.mailbox.modify(ref.id, add=[self.settings.answered_label], remove=remove)
        self.ledger.record_done(ref.id)

    def _skip(self, ref: MessageRef, decision: Decision) -> Outcome:
        if not self.dry_run:
            self.ledger.record_final(ref.id, ref.thread_id, decision)
        log.debug("skipped %s: %s", ref.id, "; ".join(decision.reasons))
        return Outcome(ref, Status.SKIPPED, decision)

    def _escalate(self, ref: MessageRef, decision: Decision) -> Outcome:
        decision = replace(decision, action=Action.ESCALATE)
        if self.dry_run:
            return Outcome(ref, Status.WOULD_ESCALATE, decision)
        self.mailbox.modify(ref.id, add=[self.settings.needs_human_label])
        self.ledger.record_final(ref.id, ref.thread_id, decision)
        log.info(
            "escalated %s from %s to a person: %s",
            ref.id, decision.sender or "an unknown sender", "; ".join(decision.reasons),
        )
        return Outcome(ref, Status.ESCALATED, decision)

    def _defer(self, ref: MessageRef, error: str) -> Outcome:
        log.warning("message %s deferred to the next cycle: %s", ref.id, error)
        if self.dry_run:
            return Outcome(ref, Status.DEFERRED, error=error)
        failures = self.ledger.record_failure(ref.id, ref.thread_id, error)
        if failures < self.settings.limits.max_attempts:
            return Outcome(ref, Status.DEFERRED, error=error)
        # Never retried forever: after max_attempts, a person takes over, told why.
        entry = self.ledger.get(ref.id)
        reason = (
            f"gave up after {failures} failed attempts ([limits] max_attempts); "
            f"last error: {error}"
        )
        decision = Decision(
            Action.ESCALATE,
            (reason,),
            entry.sender if entry else None,
            entry.subject if entry else "",
        )
        try:
            return self._escalate(ref, decision)
        except MessageGoneError:
            # Deleted from the mailbox: nothing left to answer or label, ever.
            gone = replace(decision, action=Action.SKIP, reasons=(*decision.reasons, "gone (404)"))
            self.ledger.record_final(ref.id, ref.thread_id, gone)
            return Outcome(ref, Status.SKIPPED, gone)
        except TransientServiceError as exc:
            log.warning("message %s: cannot escalate yet: %s", ref.id, exc)
            return Outcome(ref, Status.DEFERRED, error=error)

    def _triage_policy(self) -> triage.TriagePolicy:
        if self._policy is None:
            raise RuntimeError("Responder.start() must run before messages are handled")
        return self._policy


def _with_reason(decision: Decision, action: Action, reason: str) -> Decision:
    return replace(decision, action=action, reasons=(*decision.reasons, reason))


def triage_message(
    message: IncomingMessage, keywords: tuple[str, ...], mailbox: str, authserv_id: str
) -> Decision:
    """Offline triage of one message, as `billing-responder explain` does it."""
    policy = triage.TriagePolicy(
        keywords=keywords, mailbox_address=mailbox, trusted_authserv_ids=(authserv_id,)
    )
    return triage.decide(message, policy)
