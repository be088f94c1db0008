"""Triage: the headers of one received message in, a :class:`~billing_responder.model.Decision` out.

Pure: no I/O, no clock, no clients, and total: malformed, missing, undecodable or oversized headers
give a decision with a reason, never an exception.

The three outcomes, and what leads to each:

**skip** -- the message is not ours to answer, and a person loses nothing if we stay silent (it
stays in the inbox as it was). Every skip reason that applies is listed:

- it is read (no ``UNREAD`` label), already handled (the ledger says so), or labelled SPAM, TRASH,
  SENT or DRAFT by Gmail;
- its decoded subject contains none of the configured keywords as a whole word;
- it comes from our own mailbox (From or Sender, compared case-insensitively);
- it carries any sign of automated mail (:func:`automated_signals`): RFC 3834 ``Auto-Submitted``
  other than ``no``; ``List-*`` headers (RFC 2369/2919); ``Precedence: bulk|list|junk|auto_reply``;
  the ``X-Autoreply`` family, ``X-Auto-Response-Suppress`` and ``X-Loop``; a report as the top-level
  type (``multipart/report`` and friends: bounces, read receipts, abuse reports);
  ``X-Failed-Recipients`` (Exim) and ``X-MS-Exchange-Message-Is-NDR`` (Exchange) bounces;
  ``X-Apple-Action: VACATION`` (iCloud); a null ``Return-Path: <>`` (RFC 5321 4.5.5: bounces have
  no return path) or a null From; a mail-system or no-reply address (MAILER-DAEMON, postmaster,
  no-reply, do-not-reply, owner-*, *-request, ...) in From, Sender or Return-Path (RFC 3834 and
  Sieve vacation, RFC 5230 4.5); a subject that opens like a bounce or an out-of-office.

**escalate** -- billing mail we would answer but cannot safely answer automatically, so a person
should look (it gets the needs-human label; no link is sent):

- its sender is not authenticated: the first ``Authentication-Results`` header written by a
  trusted server (Gmail's ``mx.google.com`` by default; the topmost is the receiving server's own,
  anything below it is the sender's to forge) does not report ``dmarc=pass`` for the From domain,
  or, when the domain publishes no DMARC policy, a ``dkim=pass`` or ``spf=pass`` aligned with it.
  An unauthenticated From is a claim nobody vouched for -- forged mail, or a customer whose mail
  system is misconfigured -- and a portal link must not be sent on its strength;
- no single sender to answer: no From, several From headers, several addresses, group syntax, an
  unparseable or non-ASCII address (:func:`~billing_responder.mail.sender_address`);
- a reply to one of our own automatic replies (a customer answering the portal link needs a
  person, not a second link);
- headers larger than :attr:`TriagePolicy.max_header_bytes`.

Escalation applies only when no skip reason does: automated mail is never escalated, so bounces
and auto-replies never fill the needs-human queue. (Huge values cannot make the checks slow:
address headers over a few kilobytes are refused unparsed, see
:data:`~billing_responder.mail.MAX_ADDRESS_HEADER_CHARS`.)

**reply** -- every check passed. A missing or malformed Message-ID does not block a reply: the
reply is then sent without In-Reply-To, and the reasons say so.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from billing_responder.mail import (
    AuthenticationResults,
    SenderProblem,
    SenderProblemKind,
    decode_header_value,
    domain_of,
    header_keyword,
    header_size,
    is_own_message_id,
    mailboxes,
    message_ids,
    original_message_id,
    parse_authentication_results,
    same_address,
    sender_address,
    single_line,
)
from billing_responder.model import Action, Decision, IncomingMessage

#: Gmail labels that mean the message is not an incoming message waiting for an answer.
SKIPPED_LABELS = ("SPAM", "TRASH", "SENT", "DRAFT")

#: Decoded subjects are kept (in the Decision) and shown up to this many characters.
MAX_SUBJECT_SHOWN = 300


@dataclass(frozen=True)
class TriagePolicy:
    """What triage needs from the configuration.

    ``keywords`` match as whole words, case-insensitively, in the decoded subject; a keyword of
    several words matches across any white space. ``mailbox_address`` is our own address: mail
    from it is never answered. Authentication is trusted only from ``trusted_authserv_ids``;
    ``require_authentication=False`` turns the check off (for test mailboxes whose mail is not
    stamped by a receiving server).
    """

    keywords: tuple[str, ...]
    mailbox_address: str
    #: Other addresses the mailbox sends as (Gmail "Send mail as" aliases): never answered either.
    aliases: tuple[str, ...] = ()
    max_header_bytes: int = 256_000
    trusted_authserv_ids: tuple[str, ...] = ("mx.google.com",)
    require_authentication: bool = True


def decide(
    message: IncomingMessage, policy: TriagePolicy, *, already_handled: bool = False
) -> Decision:
    """Decide whether to reply to, skip or escalate ``message``, with every reason that applies."""
    subject = decode_header_value(message.get("Subject") or "")
    shown = subject[:MAX_SUBJECT_SHOWN]
    skip = _state_reasons(message, already_handled)
    keyword = matching_keyword(subject, policy.keywords)
    if keyword is None:
        keywords = ", ".join(repr(k) for k in policy.keywords)
        skip.append(f"not billing: the subject {shown!r} contains none of the keywords {keywords}")

    sender = sender_address(message)
    for own in (policy.mailbox_address, *policy.aliases):
        if own and _from_our_mailbox(message, own):
            skip.append(f"sent by our own mailbox {own}")
            break
    own_id = original_message_id(message)
    if own_id is not None and is_own_message_id(own_id):
        skip.append(f"it is one of our own automatic replies ({own_id}) come back")
    skip.extend(automated_signals(message, sender))
    escalate: list[str] = []
    size = header_size(message.headers)
    if size > policy.max_header_bytes:
        escalate.append(
            f"headers take {size:,} bytes, over the limit of {policy.max_header_bytes:,}:"
            " too unusual to answer automatically"
        )
    authenticated = "sender authentication is turned off in the policy"
    if isinstance(sender, SenderProblem):
        if sender.kind is not SenderProblemKind.NULL:  # a null From is an automated signal
            escalate.append(f"no single sender to answer: {sender}")
    elif policy.require_authentication:
        passed, authenticated = sender_authentication(message, sender, policy.trusted_authserv_ids)
        if not passed:
            # A person decides: it may be a customer whose mail system is misconfigured, or a
            # forgery. Either way the From is a claim nobody vouched for, so no link goes out.
            escalate.append(
                f"sender {sender} is not authenticated, so no portal link: {authenticated}"
            )
    ours = [i for i in _ids(message, "In-Reply-To", "References") if is_own_message_id(i)]
    if ours:
        escalate.append(
            f"answers an automatic reply we sent ({ours[-1]}); a person should take it from here"
        )

    replying = [
        f"the subject mentions {keyword!r}",
        "unread and not handled before",
        f"sender {sender}: {authenticated}",
        "no sign of automated mail",
    ]
    if original_message_id(message) is None:
        replying.append("no well-formed Message-ID: the reply cannot set In-Reply-To")
    return _decision(skip, escalate, replying, sender if isinstance(sender, str) else None, shown)


def _state_reasons(message: IncomingMessage, already_handled: bool) -> list[str]:
    reasons = []
    if "UNREAD" not in message.label_ids:
        reasons.append("already read: the message has no UNREAD label")
    if already_handled:
        reasons.append("already handled: the ledger records an earlier outcome for this message")
    reasons.extend(
        f"Gmail labels the message {label}"
        for label in SKIPPED_LABELS
        if label in message.label_ids
    )
    return reasons


def _decision(
    skip: list[str], escalate: list[str], replying: list[str], sender: str | None, subject: str
) -> Decision:
    if skip:
        return Decision(Action.SKIP, _lines(skip), sender, subject)
    if escalate:
        return Decision(Action.ESCALATE, _lines(escalate), sender, subject)
    return Decision(Action.REPLY, _lines(replying), sender, subject)


def _lines(reasons: Iterable[str]) -> tuple[str, ...]:
    # Reasons end up in logs and JSON: one line each, whatever the headers held.
    return tuple(single_line(reason) for reason in reasons)


def _show(value: str, limit: int = 80) -> str:
    """A header-derived value as it may appear inside a reason: one line, at most ``limit``."""
    text = single_line(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _ids(message: IncomingMessage, *names: str) -> Iterable[str]:
    for name in names:
        for value in message.get_all(name):
            yield from message_ids(value)


# --- keywords --------------------------------------------------------------------------------


def matching_keyword(subject: str, keywords: Iterable[str]) -> str | None:
    """The first keyword found in ``subject`` as a whole word (or words), or None.

    Case-insensitive (Unicode case folding) and width-insensitive (NFKC), so "INVOICE", "Invoice"
    and its full-width form all match "invoice"; "invoicer" and "reinvoiced" do not. The
    subject is expected decoded (see :func:`~billing_responder.mail.decode_header_value`).
    """
    text = unicodedata.normalize("NFKC", subject).casefold()
    for keyword in keywords:
        words = unicodedata.normalize("NFKC", keyword).casefold().split()
        if not words:
            continue
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(word) for word in words) + r"(?!\w)"
        if re.search(pattern, text):
            return keyword
    return None


# --- own mail --------------------------------------------------------------------------------


def _from_our_mailbox(message: IncomingMessage, mailbox_address: str) -> bool:
    for name in ("From", "Sender"):
        for value in message.get_all(name):
            for address in mailboxes(value) or ():
                if address.username and same_address(address.addr_spec, mailbox_address):
                    return True
    return False


# --- automated mail --------------------------------------------------------------------------

_AUTOREPLY_HEADERS = (
    "X-Autoreply",
    "X-Autorespond",
    "X-Autoresponder",
    "X-Autogenerated",
    "X-Autoreply-From",
    "X-Mail-Autoreply",
    "X-Auto-Response-Suppress",
    "X-Loop",
)
_BULK_PRECEDENCE = frozenset({"bulk", "list", "junk", "auto_reply"})
_REPORT_TYPES = frozenset(
    {
        "multipart/report",
        "message/delivery-status",
        "message/disposition-notification",
        "message/feedback-report",
    }
)
_BOUNCE_HEADERS = {
    "X-Failed-Recipients": "lists failed recipients, as Exim bounces do",
    "X-MS-Exchange-Message-Is-NDR": "is an Exchange non-delivery report",
}
# Local parts of mail-system and no-reply addresses, compared without case and without the
# separators "-", "_" and "." (so post_master, Mailer-Daemon, no.reply and do_not_reply match).
_MACHINE_LOCAL_PARTS = frozenset(
    {"mailerdaemon", "postmaster", "noreply", "donotreply", "dontreply", "bounce", "bounces"}
)
_MACHINE_PREFIXES = ("owner-", "bounce-", "bounces-", "noreply", "no-reply", "donotreply")
_MACHINE_SUFFIXES = ("-request", "-owner", "-bounces")
_AUTOMATED_SUBJECT = re.compile(
    r"""^\s*(?:
        auto(?:matic|matische)?[ -]?(?:reply|response|antwort)\b | auto: |
        out\ of\ (?:the\ )?office\b | abwesenheitsnotiz\b | r[ée]ponse\ automatique\b |
        undeliver(?:able|ed)\b | non[ -]?deliver | delivery\ (?:status\ )?notification\b |
        delivery\ (?:failure|has\ failed)\b | mail\ delivery\ (?:failed|failure)\b |
        returned\ mail\b | failure\ notice\b | mail\ system\ error\b
    )""",
    re.IGNORECASE | re.VERBOSE,
)


def automated_signals(
    message: IncomingMessage, sender: str | SenderProblem | None = None
) -> tuple[str, ...]:
    """Every sign that ``message`` was sent by a machine, as readable reasons (empty: none).

    ``sender`` is :func:`~billing_responder.mail.sender_address` of the message, when the caller
    already has it.
    """
    if sender is None:
        sender = sender_address(message)
    return _lines(reason for check in _AUTOMATED_CHECKS for reason in check(message, sender))


_Check = Callable[[IncomingMessage, str | SenderProblem], Iterable[str]]


def _auto_submitted(message: IncomingMessage, _: str | SenderProblem) -> Iterable[str]:
    for value in message.get_all("Auto-Submitted"):
        keyword = header_keyword(value)
        if keyword != "no":
            yield f"automated: Auto-Submitted: {_show(keyword) or '(empty)'} (RFC 3834)"


def _list_headers(message: IncomingMessage, _: str | SenderProblem) -> Iterable[str]:
    names = sorted({name.title() for name in message.names() if name.startswith("list-")})
    if names:
        yield f"automated: mailing-list headers {_show(', '.join(names))} (RFC 2369)"


def _precedence(message: IncomingMessage, _: str | SenderProblem) -> Iterable[str]:
    for value in message.get_all("Precedence"):
        if header_keyword(value) in _BULK_PRECEDENCE:
            yield f"automated: Precedence: {_show(header_keyword(value))}"


def _autoreply_headers(message: IncomingMessage, _: str | SenderProblem) -> Iterable[str]:
    for name in _AUTOREPLY_HEADERS:
        if message.has(name):
            yield f"automated: {name} header (auto-responders set it)"
    if any("vacation" in value.lower() for value in message.get_all("X-Apple-Action")):
        yield "automated: X-Apple-Action: VACATION (an iCloud vacation reply)"


def _reports(message: IncomingMessage, _: str | SenderProblem) -> Iterable[str]:
    for value in message.get_all("Content-Type"):
        media_type = header_keyword(value)
        if media_type in _REPORT_TYPES:
            yield f"automated: Content-Type {_show(media_type)} (a delivery or feedback report)"
    for name, what in _BOUNCE_HEADERS.items():
        if message.has(name):
            yield f"automated: the message {what} ({name})"


def _null_senders(message: IncomingMessage, sender: str | SenderProblem) -> Iterable[str]:
    if isinstance(sender, SenderProblem) and sender.kind is SenderProblemKind.NULL:
        yield "automated: From is the null address <>, which only mail systems use"
    if any(header_keyword(v).replace(" ", "") == "<>" for v in message.get_all("Return-Path")):
        yield "automated: empty Return-Path <> (bounces have no return path)"


def _automated_subject(message: IncomingMessage, _: str | SenderProblem) -> Iterable[str]:
    opening = _AUTOMATED_SUBJECT.match(decode_header_value(message.get("Subject") or ""))
    if opening:
        yield f"automated: the subject opens like a bounce or auto-reply: {opening.group(0)!r}"


def _machine_addresses(message: IncomingMessage, _: str | SenderProblem) -> Iterable[str]:
    for name in ("From", "Sender", "Return-Path"):
        for value in message.get_all(name):
            for address in mailboxes(value) or ():
                if address.username and is_machine_local_part(address.username):
                    yield (
                        f"automated: {name} {_show(address.addr_spec)} is a mail-system"
                        " or no-reply address"
                    )


_AUTOMATED_CHECKS: tuple[_Check, ...] = (
    _auto_submitted,
    _list_headers,
    _precedence,
    _autoreply_headers,
    _reports,
    _null_senders,
    _machine_addresses,
    _automated_subject,
)


def is_machine_local_part(local_part: str) -> bool:
    """Whether an address's local part is a mail system's or a no-reply one."""
    lowered = local_part.strip('"').lower()
    squeezed = re.sub(r"[-_.]", "", lowered)
    return (
        squeezed in _MACHINE_LOCAL_PARTS
        or lowered.startswith(_MACHINE_PREFIXES)
        or squeezed.startswith(("noreply", "donotreply", "mailerdaemon"))
        or lowered.endswith(_MACHINE_SUFFIXES)
    )


# --- authentication --------------------------------------------------------------------------


def sender_authentication(
    message: IncomingMessage, sender: str, trusted_authserv_ids: Iterable[str]
) -> tuple[bool, str]:
    """Whether a trusted receiving server authenticated the domain of ``sender``, and how.

    Only the first Authentication-Results header from a trusted server counts. DMARC decides when
    the domain has a policy (``dmarc=pass`` with ``header.from`` equal to the sender's domain;
    ``fail``, ``temperror``, ``permerror`` refuse); without a DMARC result, or with ``dmarc=none``
    (no policy published), a ``dkim=pass`` (``header.d``/``header.i``) or ``spf=pass``
    (``smtp.mailfrom``) whose domain is the sender's, a parent or a subdomain of it (relaxed
    alignment) suffices.
    """
    trusted = tuple(t.lower() for t in trusted_authserv_ids)
    domain = domain_of(sender)
    if domain is None:
        return False, f"{sender!r} is not an address with a domain"
    results = _trusted_results(message, trusted)
    if results is None:
        return False, "no Authentication-Results header from " + " or ".join(trusted)
    server = _show(results.authserv_id)
    # dmarc=none: the domain publishes no DMARC policy (RFC 7489 11.2), so DMARC cannot decide;
    # Microsoft's "bestguesspass" says the same with a guess we do not take on trust.
    dmarc = [
        r for r in results.results if r.method == "dmarc" and r.result not in _NO_DMARC_POLICY
    ]
    if dmarc:
        for result in dmarc:
            if result.result == "pass" and result.get("header.from") == domain:
                return True, f"{server} reports dmarc=pass for {domain}"
        verdicts = ", ".join(f"dmarc={r.result} for {r.get('header.from')}" for r in dmarc)
        verdicts = _show(verdicts)
        return False, f"{server} reports {verdicts}"
    for result in results.results:
        if result.result != "pass":
            continue
        if result.method == "dkim":
            signer = result.get("header.d") or _after_at(result.get("header.i"))
        elif result.method == "spf":
            signer = _after_at(result.get("smtp.mailfrom"))
        else:
            continue
        if signer and _aligned(signer, domain):
            return True, f"{server} reports {result.method}=pass for {_show(signer)}"
    return False, (
        f"{server} reports no DMARC policy for {domain} and no dkim or spf pass aligned with it"
    )


_NO_DMARC_POLICY = frozenset({"none", "bestguesspass"})


def _trusted_results(
    message: IncomingMessage, trusted: tuple[str, ...]
) -> AuthenticationResults | None:
    for value in message.get_all("Authentication-Results"):
        parsed = parse_authentication_results(value)
        if parsed is not None and parsed.authserv_id in trusted:
            return parsed
    return None


def _after_at(value: str | None) -> str | None:
    if not value:
        return None
    return value.rpartition("@")[2] or None


def _aligned(signer: str, domain: str) -> bool:
    signer, domain = signer.lower().rstrip("."), domain.lower().rstrip(".")
    return (
        signer == domain
        or ("." in signer and domain.endswith("." + signer))
        or signer.endswith("." + domain)
    )


@dataclass(frozen=True)
class AuthenticationReport:
    """How :func:`sender_authentication` reached its verdict, header by header, for `explain`."""

    sender: str | None
    authenticated: bool
    verdict: str
    #: One line per Authentication-Results header, top to bottom: trusted, or why it was ignored.
    headers: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        """The ``authentication`` object `billing-responder explain` prints."""
        return {
            "sender": self.sender,
            "authenticated": self.authenticated,
            "verdict": self.verdict,
            "headers": list(self.headers),
        }


def authentication_report(
    message: IncomingMessage, trusted_authserv_ids: Iterable[str]
) -> AuthenticationReport:
    """The sender-authentication verdict for ``message`` with the part each header played."""
    trusted = tuple(t.lower() for t in trusted_authserv_ids)
    lines: list[str] = []
    found = False
    for value in message.get_all("Authentication-Results"):
        parsed = parse_authentication_results(value)
        shown = _show(value, 160)
        if parsed is None:
            lines.append(f"ignored (no authserv-id): {shown}")
        elif found:
            lines.append(f"ignored (below the trusted header, so anyone could write it): {shown}")
        elif parsed.authserv_id in trusted:
            found = True
            lines.append(f"trusted (the receiving server's own): {shown}")
        else:
            server = _show(parsed.authserv_id)
            lines.append(f"ignored ({server} is not a trusted authserv-id): {shown}")
    sender = sender_address(message)
    if isinstance(sender, SenderProblem):
        return AuthenticationReport(None, False, f"no single sender: {sender}", tuple(lines))
    passed, verdict = sender_authentication(message, sender, trusted)
    return AuthenticationReport(sender, passed, verdict, tuple(lines))
