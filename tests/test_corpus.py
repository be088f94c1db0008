"""Triage against real mail: the shared corpus of machine-generated and human messages.

The corpus lives next to the project (``../shared/corpus``, see its README). Automated messages
must be skipped as they are. With their Subject rewritten to mention an invoice, and with their
sender identity (From, Sender, Reply-To, Return-Path) rewritten to a paying customer's address,
they must still get no link: skipped for their markers, or escalated to a person because no
trusted server authenticated the sender. Human messages, with a billing Subject, must be
answered. Rewrites happen on the raw bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from billing_responder.mail import message_from_bytes, sender_address
from billing_responder.model import Action, Decision
from billing_responder.triage import (
    TriagePolicy,
    automated_signals,
    decide,
    sender_authentication,
)

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
EXPECTED_FILES = {"automated": 287, "human": 6}
MAILBOX = "billing@support.example.net"
POLICY = TriagePolicy(keywords=("invoice", "billing"), mailbox_address=MAILBOX)
TRUSTED = POLICY.trusted_authserv_ids
CUSTOMER = b"customer@customer.example"

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


def corpus_files(kind: str) -> list[Path]:
    """The .eml files of one corpus folder, by name."""
    return sorted((CORPUS / kind).glob("*.eml"))


def corpus_params(kind: str) -> list[object]:
    """Test parameters named after the files, or one failing stand-in when the corpus is missing."""
    files = corpus_files(kind)
    if len(files) < EXPECTED_FILES[kind]:
        return [pytest.param(None, id=f"{kind}-corpus-missing")]
    return [pytest.param(path, id=path.name) for path in files]


def read(path: Path | None) -> bytes:
    """The raw file, failing loudly (never skipping) when the corpus is not there."""
    if path is None:
        pytest.fail(f"the mail corpus is missing or incomplete under {CORPUS}; see its README")
    return path.read_bytes()


def rewrite(raw: bytes, *, drop: set[bytes], add: list[bytes]) -> bytes:
    """``raw`` with the headers named in ``drop`` (and their continuation lines) removed and
    ``add`` appended to the header block, in the file's own line ending."""
    end = _HEADER_END.search(raw)
    cut = end.start() if end else len(raw)
    head, rest = raw[:cut], raw[cut:]
    newline = b"\r\n" if b"\r\n" in raw[: cut + 2] else b"\n"
    kept: list[bytes] = []
    dropping = False
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        field = _FIELD_NAME.match(line)
        dropping = field is not None and field.group(1).lower() in drop
        if not dropping:
            kept.append(line)
    return newline.join(kept + add) + (rest or newline + newline)


def with_invoice_subject(raw: bytes) -> bytes:
    """The message with its Subject replaced by one that mentions an invoice."""
    return rewrite(raw, drop={b"subject"}, add=[b"Subject: Invoice INV-2024-0042 question"])


def from_paying_customer(raw: bytes) -> bytes:
    """The message with an invoice Subject and a paying customer as its every sender identity."""
    return rewrite(
        with_invoice_subject(raw),
        drop={b"from", b"sender", b"reply-to", b"return-path"},
        add=[b"From: Paying Customer <" + CUSTOMER + b">", b"Return-Path: <" + CUSTOMER + b">"],
    )


def never_answered(decision: Decision) -> bool:
    """Whether a decision sends no link for the only reasons left once the message is unread,
    unhandled and mentions an invoice: skipped as automated mail, or escalated to a person
    because no trusted server authenticated its sender."""
    if decision.action is Action.SKIP:
        return all(reason.startswith("automated: ") for reason in decision.reasons)
    if decision.action is Action.ESCALATE:
        return len(decision.reasons) == 1 and " is not authenticated, " in decision.reasons[0]
    return False


def triage(raw: bytes) -> Decision:
    """The decision for a raw message, as `billing-responder explain` makes it."""
    return decide(message_from_bytes(raw), POLICY)


class TestCorpusIsPresent:
    @pytest.mark.parametrize(("kind", "expected"), sorted(EXPECTED_FILES.items()))
    def test_folder_has_every_file(self, kind: str, expected: int) -> None:
        """The corpus folders exist and hold at least the files these tests were written for."""
        assert (CORPUS / kind).is_dir(), f"missing corpus folder {CORPUS / kind}"
        assert len(corpus_files(kind)) >= expected


class TestAutomatedMailIsNeverAnswered:
    @pytest.mark.parametrize("path", corpus_params("automated"))
    def test_as_delivered(self, path: Path | None) -> None:
        """A machine-generated message is skipped as it is; if Gmail authenticated it, by its markers."""
        message = message_from_bytes(read(path))
        decision = decide(message, POLICY)
        assert decision.action is Action.SKIP, decision.reasons
        sender = sender_address(message)
        if isinstance(sender, str) and sender_authentication(message, sender, TRUSTED)[0]:
            assert automated_signals(message), "authenticated machine mail needs a marker"

    @pytest.mark.parametrize("path", corpus_params("automated"))
    def test_with_an_invoice_subject(self, path: Path | None) -> None:
        """A machine-generated message mentioning an invoice gets no link: skipped, or escalated if unvouched."""
        raw = with_invoice_subject(read(path))
        assert message_from_bytes(raw).get("Subject") == "Invoice INV-2024-0042 question"
        decision = triage(raw)
        assert never_answered(decision), decision

    @pytest.mark.parametrize("path", corpus_params("automated"))
    def test_from_a_paying_customer(self, path: Path | None) -> None:
        """A machine-generated message forged to come from a paying customer never gets a link."""
        raw = from_paying_customer(read(path))
        message = message_from_bytes(raw)
        assert message.get_all("From") == ["Paying Customer <customer@customer.example>"]
        decision = triage(raw)
        assert never_answered(decision), decision

    def test_markers_alone_recognise_all_but_the_unmarked(self) -> None:
        """Without the authentication check, automated-mail markers still catch all but one message.

        The one is a person forwarding a bounce to themselves (Apple Mail, no trace headers): with
        its Subject rewritten it carries no machine marker, only the lack of an authenticated
        sender, so the markers must never be the only line of defence.
        """
        files = corpus_files("automated")
        assert len(files) >= EXPECTED_FILES["automated"]
        unmarked = [
            p.name
            for p in files
            if not automated_signals(message_from_bytes(with_invoice_subject(p.read_bytes())))
        ]
        assert len(unmarked) <= 1, unmarked


class TestHumanMailIsAnswered:
    @pytest.mark.parametrize("path", corpus_params("human"))
    def test_with_a_billing_subject(self, path: Path | None) -> None:
        """A person's message about billing, authenticated by Gmail, gets a reply."""
        raw = rewrite(
            read(path), drop={b"subject"}, add=[b"Subject: Re: question about my billing"]
        )
        decision = triage(raw)
        assert decision.action is Action.REPLY, decision.reasons
        assert decision.sender is not None and decision.sender != MAILBOX
        assert not automated_signals(message_from_bytes(raw))

    @pytest.mark.parametrize("path", corpus_params("human"))
    def test_as_delivered_is_not_billing(self, path: Path | None) -> None:
        """The same messages with their own Subject ("Test") are skipped as not billing, and for nothing else."""
        decision = triage(read(path))
        assert decision.action is Action.SKIP
        assert len(decision.reasons) == 1 and decision.reasons[0].startswith("not billing")
