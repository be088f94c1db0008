"""Triage rules, each in isolation, with the reasons they give (billing_responder.triage)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_responder.mail import new_message_id
from billing_responder.model import Action, Decision, IncomingMessage
from billing_responder.triage import (
    TriagePolicy,
    automated_signals,
    decide,
    is_machine_local_part,
    matching_keyword,
)

MAILBOX = "billing@support.example.net"
POLICY = TriagePolicy(keywords=("invoice", "billing", "payment method"), mailbox_address=MAILBOX)
PASSING = (
    "mx.google.com; dkim=pass header.i=@example.com header.s=s1; "
    "spf=pass (google.com: domain of alice@example.com designates 192.0.2.1 as permitted sender)"
    " smtp.mailfrom=alice@example.com; dmarc=pass (p=NONE sp=NONE dis=NONE) header.from=example.com"
)
HUMAN = (
    ("Authentication-Results", PASSING),
    ("From", "Alice Example <alice@example.com>"),
    ("To", MAILBOX),
    ("Subject", "Question about my invoice"),
    ("Message-ID", "<CAF0001@mail.example.com>"),
    ("Date", "Tue, 4 Mar 2025 10:00:00 +0000"),
)
UNREAD = frozenset({"INBOX", "UNREAD"})


def incoming(
    *added: tuple[str, str],
    drop: tuple[str, ...] = (),
    labels: frozenset[str] = UNREAD,
    **replaced: str,
) -> IncomingMessage:
    """The ordinary human billing message, with headers dropped, replaced (by keyword, "_" for "-") or added."""
    changes = {name.replace("_", "-").lower(): value for name, value in replaced.items()}
    gone = {name.lower() for name in drop} | set(changes)
    headers = [(n, v) for n, v in HUMAN if n.lower() not in gone]
    headers += [(n.replace("_", "-").title(), v) for n, v in replaced.items()]
    headers += list(added)
    return IncomingMessage("m1", "t1", labels, tuple(headers))


def decided(message: IncomingMessage, policy: TriagePolicy = POLICY, **kwargs: bool) -> Decision:
    """decide(), checking the invariants every decision keeps."""
    decision = decide(message, policy, **kwargs)
    assert decision.reasons, "every decision gives at least one reason"
    assert all(isinstance(r, str) and r and "\n" not in r for r in decision.reasons)
    return decision


def has_reason(decision: Decision, fragment: str) -> bool:
    """Whether some reason mentions ``fragment`` (case-insensitively)."""
    return any(fragment.lower() in reason.lower() for reason in decision.reasons)


class TestTheOrdinaryMessage:
    def test_human_billing_mail_gets_a_reply(self) -> None:
        """An unread, authenticated human message about an invoice is answered."""
        decision = decided(incoming())
        assert decision.action is Action.REPLY
        assert decision.sender == "alice@example.com"
        assert decision.subject == "Question about my invoice"
        assert has_reason(decision, "mentions 'invoice'")
        assert has_reason(decision, "dmarc=pass for example.com")

    def test_as_json(self) -> None:
        """The explain shape is the action's value and the list of reasons."""
        shown = decided(incoming()).as_json()
        assert shown["action"] == "reply"
        assert isinstance(shown["reasons"], list) and shown["reasons"]


class TestKeywords:
    @pytest.mark.parametrize(
        "subject",
        [
            "Invoice #123",
            "invoice?",
            "Where is my INVOICE",
            "Re: [Acme] invoice-related question",
            "Update payment   method",
            "Payment\tMethod change",
            "\uff49\uff4e\uff56\uff4f\uff49\uff43\uff45 please",
        ],
    )
    def test_whole_word_matches(self, subject: str) -> None:
        """A keyword matches as a word, in any case, width or spacing."""
        assert decided(incoming(Subject=subject)).action is Action.REPLY

    @pytest.mark.parametrize(
        "subject",
        [
            "invoicer",
            "reinvoiced",
            "preinvoice",
            "e_invoice",
            "invoices",
            "invoice_2024",
            "payment methods",
            "paymentmethod",
        ],
    )
    def test_part_of_a_word_does_not_match(self, subject: str) -> None:
        """A keyword inside a longer word is not a match (plurals must be configured)."""
        decision = decided(incoming(Subject=subject))
        assert decision.action is Action.SKIP
        assert has_reason(decision, "not billing")

    @pytest.mark.parametrize(
        ("raw", "decoded"),
        [
            ("=?UTF-8?B?SW52b2ljZSAjMTI=?=", "Invoice #12"),
            ("=?utf-8?q?Your_invoice=3F?=", "Your invoice?"),
            ("=?iso-8859-1?q?Facture_/_invoice_d=E9cembre?=", "Facture / invoice décembre"),
            ("=?UTF-8?B?0KHRh9GR0YIgLyBJbnZvaWNl?=", "Счёт / Invoice"),
        ],
    )
    def test_encoded_subjects_are_decoded_first(self, raw: str, decoded: str) -> None:
        """RFC 2047 B and Q subjects, ASCII or not, are matched after decoding."""
        decision = decided(incoming(Subject=raw))
        assert decision.action is Action.REPLY
        assert decision.subject == decoded

    def test_non_ascii_keyword(self) -> None:
        """A non-ASCII keyword matches a non-ASCII encoded subject, ignoring case."""
        policy = TriagePolicy(keywords=("счёт", "Rechnung"), mailbox_address=MAILBOX)
        assert decided(incoming(Subject="=?UTF-8?B?0KHQp9CB0KIg4oSWNQ==?="), policy).action is (
            Action.REPLY
        )
        assert matching_keyword("Ihre RECHNUNG", policy.keywords) == "Rechnung"

    def test_missing_subject(self) -> None:
        """A message without Subject is skipped as not billing."""
        decision = decided(incoming(drop=("Subject",)))
        assert decision.action is Action.SKIP
        assert decision.reasons == (
            "not billing: the subject '' contains none of the keywords "
            "'invoice', 'billing', 'payment method'",
        )

    def test_blank_keywords_match_nothing(self) -> None:
        """Empty or blank keywords never match, even an empty subject."""
        assert matching_keyword("", ("", "  ")) is None


class TestMessageState:
    def test_read_mail_is_skipped(self) -> None:
        """A message without the UNREAD label is skipped."""
        decision = decided(incoming(labels=frozenset({"INBOX"})))
        assert decision.action is Action.SKIP
        assert decision.reasons == ("already read: the message has no UNREAD label",)

    def test_handled_mail_is_skipped(self) -> None:
        """A message the ledger already handled is skipped."""
        decision = decided(incoming(), already_handled=True)
        assert decision.action is Action.SKIP
        assert decision.reasons == (
            "already handled: the ledger records an earlier outcome for this message",
        )

    @pytest.mark.parametrize("label", ["SPAM", "TRASH", "SENT", "DRAFT"])
    def test_gmail_labels(self, label: str) -> None:
        """Spam, trash, sent and draft messages are skipped."""
        decision = decided(incoming(labels=UNREAD | {label}))
        assert decision.action is Action.SKIP
        assert decision.reasons == (f"Gmail labels the message {label}",)

    def test_all_skip_reasons_are_listed(self) -> None:
        """Every reason that applies is given, not only the first."""
        decision = decided(
            incoming(("Precedence", "bulk"), labels=frozenset(), Subject="Hello"),
            already_handled=True,
        )
        assert decision.action is Action.SKIP
        assert len(decision.reasons) == 4
        assert has_reason(decision, "already read")
        assert has_reason(decision, "already handled")
        assert has_reason(decision, "not billing")
        assert has_reason(decision, "Precedence: bulk")


class TestOwnMail:
    @pytest.mark.parametrize(
        "message",
        [incoming(From="Billing <BILLING@Support.Example.NET>"), incoming(("Sender", MAILBOX))],
        ids=["from", "sender"],
    )
    def test_mail_from_our_mailbox_is_skipped(self, message: IncomingMessage) -> None:
        """Mail whose From or Sender is our mailbox, in any case, is never answered."""
        decision = decided(message)
        assert decision.action is Action.SKIP
        assert has_reason(decision, f"sent by our own mailbox {MAILBOX}")


class TestAutomatedMarkers:
    @pytest.mark.parametrize(
        ("header", "fragment"),
        [
            (("Auto-Submitted", "auto-replied"), "Auto-Submitted: auto-replied (RFC 3834)"),
            (
                ("Auto-Submitted", "Auto-Generated; owner-email=x@example.com"),
                "Auto-Submitted: auto-generated",
            ),
            (("Auto-Submitted", "auto-notified (comment)"), "Auto-Submitted: auto-notified"),
            (("Auto-Submitted", ""), "Auto-Submitted: (empty)"),
            (("List-Id", "<billing.lists.example.com>"), "mailing-list headers List-Id"),
            (
                ("List-Unsubscribe", "<mailto:u@example.com>"),
                "mailing-list headers List-Unsubscribe",
            ),
            (("List-Post", "NO"), "mailing-list headers List-Post"),
            (("Precedence", "bulk"), "Precedence: bulk"),
            (("Precedence", "List"), "Precedence: list"),
            (("Precedence", "junk"), "Precedence: junk"),
            (("Precedence", "auto_reply"), "Precedence: auto_reply"),
            (("X-Autoreply", "yes"), "X-Autoreply header"),
            (("X-Autorespond", "Out of office"), "X-Autorespond header"),
            (("X-Auto-Response-Suppress", "All"), "X-Auto-Response-Suppress header"),
            (("X-Auto-Response-Suppress", "DR, RN"), "X-Auto-Response-Suppress header"),
            (("X-Loop", "billing@example.com"), "X-Loop header"),
            (("X-Apple-Action", "VACATION"), "X-Apple-Action: VACATION"),
            (
                ("Content-Type", "multipart/report; report-type=delivery-status; boundary=x"),
                "Content-Type multipart/report",
            ),
            (
                ("Content-Type", 'Multipart/Report; report-type="disposition-notification"'),
                "Content-Type multipart/report",
            ),
            (
                ("Content-Type", "multipart/report; report-type=feedback-report"),
                "Content-Type multipart/report",
            ),
            (("Content-Type", "message/delivery-status"), "Content-Type message/delivery-status"),
            (("X-Failed-Recipients", "bob@example.org"), "X-Failed-Recipients"),
            (("X-MS-Exchange-Message-Is-NDR", ""), "X-MS-Exchange-Message-Is-NDR"),
            (("Return-Path", "<>"), "empty Return-Path <>"),
            (("Return-Path", " < > "), "empty Return-Path <>"),
            (
                ("Return-Path", "<MAILER-DAEMON@mx.example.com>"),
                "Return-Path MAILER-DAEMON@mx.example.com is a mail-system",
            ),
            (
                ("Sender", "owner-billing@lists.example.com"),
                "Sender owner-billing@lists.example.com",
            ),
        ],
    )
    def test_header_markers(self, header: tuple[str, str], fragment: str) -> None:
        """Each automated-mail header, alone on an otherwise answerable message, makes it a skip."""
        decision = decided(incoming(header))
        assert decision.action is Action.SKIP
        assert has_reason(decision, fragment), decision.reasons

    @pytest.mark.parametrize(
        "address",
        [
            "MAILER-DAEMON@example.com",
            "mailer-daemon@example.com",
            "postmaster@example.com",
            "post_master@example.com",
            "no-reply@example.com",
            "noreply@example.com",
            "no_reply@example.com",
            "noreply-billing@example.com",
            "do-not-reply@example.com",
            "donotreply@example.com",
            "billing-request@example.com",
            "owner-billing@example.com",
            "bounces@example.com",
        ],
    )
    def test_machine_from_addresses(self, address: str) -> None:
        """Mail-system and no-reply senders are skipped, even when authenticated."""
        decision = decided(incoming(From=f"Robot <{address}>"))
        assert decision.action is Action.SKIP
        assert has_reason(decision, f"From {address} is a mail-system or no-reply address")

    @pytest.mark.parametrize(
        "local_part", ["alice", "noreen", "replyguy", "post", "master", "requests"]
    )
    def test_people_are_not_machines(self, local_part: str) -> None:
        """Ordinary local parts that merely resemble machine ones are not flagged."""
        assert not is_machine_local_part(local_part)

    @pytest.mark.parametrize("value", ["<>", "MAILER-DAEMON <>", "Mail Delivery System <>"])
    def test_null_from_is_automated_not_escalated(self, value: str) -> None:
        """A null From address is the mark of a mail system: skip, not escalate."""
        decision = decided(incoming(From=value))
        assert decision.action is Action.SKIP
        assert has_reason(decision, "From is the null address <>")
        assert decision.sender is None

    @pytest.mark.parametrize(
        "subject",
        [
            "Automatic reply: Invoice 12",
            "Auto reply: invoice",
            "AutoReply: invoice",
            "Out of Office: invoice",
            "Undeliverable: Invoice 12",
            "Undelivered Mail Returned to Sender (invoice)",
            "Delivery Status Notification (Failure) invoice",
            "Mail delivery failed: returning message to sender - invoice",
            "Returned mail: see transcript for details (invoice)",
            "failure notice: invoice",
        ],
    )
    def test_bounce_and_auto_reply_subjects(self, subject: str) -> None:
        """A subject that opens like a bounce or out-of-office is skipped even with a keyword."""
        decision = decided(incoming(Subject=subject))
        assert decision.action is Action.SKIP
        assert has_reason(decision, "subject opens like a bounce or auto-reply")

    @pytest.mark.parametrize(
        "header",
        [
            ("Auto-Submitted", "no"),
            ("Auto-Submitted", "No (a person wrote this)"),
            ("Precedence", "first-class"),
            ("X-Mailgun-Mailing-List-Id", "1q"),
            ("Feedback-ID", "1:campaign:sender"),
            ("X-Mailer", "Microsoft Outlook 16.0"),
            ("Content-Type", "multipart/mixed; boundary=x"),
            ("Return-Path", "<alice@example.com>"),
            ("Received", "from mail.example.com by mx.google.com"),
        ],
    )
    def test_ordinary_headers_are_not_markers(self, header: tuple[str, str]) -> None:
        """Headers people's mail carries do not count as automated (no false positives)."""
        decision = decided(incoming(header))
        assert decision.action is Action.REPLY, decision.reasons

    def test_every_marker_is_listed(self) -> None:
        """Several markers give one reason each."""
        reasons = automated_signals(
            incoming(
                ("Auto-Submitted", "auto-replied"), ("Precedence", "bulk"), ("Return-Path", "<>")
            )
        )
        assert len(reasons) == 3

    def test_automated_mail_is_never_escalated(self) -> None:
        """Automated mail with a broken From is skipped, not handed to a person."""
        decision = decided(
            incoming(("Auto-Submitted", "auto-replied"), From="a@example.com, b@example.com")
        )
        assert decision.action is Action.SKIP
        assert not has_reason(decision, "no single sender")


class TestAuthentication:
    def test_no_authentication_results(self) -> None:
        """Billing mail no trusted server vouched for goes to a person, with no link."""
        decision = decided(incoming(drop=("Authentication-Results",)))
        assert decision.action is Action.ESCALATE
        assert decision.reasons == (
            "sender alice@example.com is not authenticated, so no portal link: "
            "no Authentication-Results header from mx.google.com",
        )

    def test_untrusted_server_does_not_count(self) -> None:
        """A passing result written by any server but ours is ignored."""
        forged = "evil.example; dmarc=pass header.from=example.com"
        decision = decided(
            incoming(drop=("Authentication-Results",), Authentication_Results=forged)
        )
        assert decision.action is Action.ESCALATE
        assert has_reason(decision, "no Authentication-Results header from mx.google.com")

    def test_only_the_topmost_trusted_header_counts(self) -> None:
        """A forged passing header below the receiving server's own failing one is ignored."""
        real = "mx.google.com; dmarc=fail (p=REJECT) header.from=example.com"
        message = incoming(drop=("Authentication-Results",))
        message = IncomingMessage(
            message.id,
            message.thread_id,
            message.label_ids,
            (
                ("Authentication-Results", real),
                *message.headers,
                ("Authentication-Results", PASSING),
            ),
        )
        decision = decided(message)
        assert decision.action is Action.ESCALATE
        assert has_reason(decision, "mx.google.com reports dmarc=fail for example.com")

    def test_dmarc_pass_for_another_domain(self) -> None:
        """dmarc=pass about a different From domain does not authenticate this sender."""
        other = "mx.google.com; dmarc=pass header.from=example.org"
        decision = decided(incoming(Authentication_Results=other))
        assert decision.action is Action.ESCALATE
        assert has_reason(decision, "dmarc=pass for example.org")

    @pytest.mark.parametrize(
        "results",
        [
            "mx.google.com; dkim=pass header.d=example.com",
            "mx.google.com; dkim=pass header.i=@mail.example.com",
            "mx.google.com; spf=pass smtp.mailfrom=bounces@example.com",
            "mx.google.com; spf=fail smtp.mailfrom=x@example.com; dkim=pass header.i=@example.com",
            "mx.google.com; dkim=pass header.d=example.com; dmarc=none header.from=example.com",
            "mx.google.com; spf=pass smtp.mailfrom=example.com; dmarc=bestguesspass"
            " header.from=example.com",
        ],
    )
    def test_aligned_dkim_or_spf_without_dmarc(self, results: str) -> None:
        """Without a DMARC result or policy (none), an aligned dkim or spf pass authenticates the sender."""
        assert decided(incoming(Authentication_Results=results)).action is Action.REPLY

    @pytest.mark.parametrize(
        "results",
        [
            "mx.google.com; dkim=pass header.d=esp.example.net",
            "mx.google.com; spf=pass smtp.mailfrom=bounce@esp.example.net",
            "mx.google.com; dkim=pass header.d=com",
            "mx.google.com; spf=fail (dmarc=pass header.from=example.com) smtp.mailfrom=example.com",
            "mx.google.com; none",
            "mx.google.com; dmarc=none header.from=example.com",
            "mx.google.com; dkim=pass header.d=esp.example.net; dmarc=none header.from=example.com",
            "mx.google.com; dkim=pass header.d=example.com; dmarc=temperror header.from=example.com",
            "mx.google.com; dkim=pass header.d=example.com; dmarc=permerror header.from=example.com",
            "mx.google.com; spf=pass smtp.mailfrom=example.com; dmarc=fail header.from=example.com",
        ],
    )
    def test_unaligned_or_failing_results(self, results: str) -> None:
        """An unaligned pass, a pass in a comment, no result, or a DMARC verdict but pass does not authenticate."""
        decision = decided(incoming(Authentication_Results=results))
        assert decision.action is Action.ESCALATE
        assert has_reason(decision, "is not authenticated")

    def test_a_customer_address_in_from_is_not_enough(self) -> None:
        """A From rewritten to any address, however trusted it looks, needs its own authentication."""
        decision = decided(incoming(From="Paying Customer <customer@customer.example>"))
        assert decision.action is Action.ESCALATE
        assert has_reason(decision, "customer@customer.example is not authenticated")

    def test_other_trusted_servers(self) -> None:
        """The trusted authserv-ids come from the policy."""
        policy = TriagePolicy(("invoice",), MAILBOX, trusted_authserv_ids=("mx.example.net",))
        results = "mx.example.net; dmarc=pass header.from=example.com"
        assert decided(incoming(Authentication_Results=results), policy).action is Action.REPLY
        assert decided(incoming(), policy).action is Action.ESCALATE

    def test_check_can_be_turned_off(self) -> None:
        """require_authentication=False answers unauthenticated mail and says so."""
        policy = TriagePolicy(("invoice",), MAILBOX, require_authentication=False)
        decision = decided(incoming(drop=("Authentication-Results",)), policy)
        assert decision.action is Action.REPLY
        assert has_reason(decision, "authentication is turned off")


class TestSender:
    @pytest.mark.parametrize(
        ("message", "fragment"),
        [
            (incoming(drop=("From",)), "the message has no From header"),
            (incoming(From=""), "the From header is empty"),
            (incoming(From="alice@example.com, bob@example.com"), "From names 2 addresses"),
            (incoming(From="Billing people: alice@example.com, bob@example.com;"), "group syntax"),
            (incoming(From="undisclosed-recipients:;"), "group syntax"),
            (incoming(From="alice@"), "From cannot be parsed"),
            (incoming(From="Alice"), "lacks a local part or domain"),
            (incoming(From="Jörg <jörg@example.com>"), "not an ASCII address"),
        ],
        ids=["missing", "empty", "several", "group", "empty-group", "broken", "no-domain", "idn"],
    )
    def test_unusable_from_is_escalated(self, message: IncomingMessage, fragment: str) -> None:
        """Billing mail without one usable From address goes to a person, with the reason."""
        decision = decided(message)
        assert decision.action is Action.ESCALATE
        assert decision.sender is None
        assert len(decision.reasons) == 1
        assert decision.reasons[0].startswith("no single sender to answer: ")
        assert fragment in decision.reasons[0]

    def test_two_from_headers_are_escalated(self) -> None:
        """A message with two From headers is escalated."""
        decision = decided(incoming(("From", "mallory@example.net")))
        assert decision.action is Action.ESCALATE
        assert has_reason(decision, "the message has 2 From headers")

    def test_skip_reasons_win_over_escalation(self) -> None:
        """A broken From on mail that is not billing anyway is a skip."""
        decision = decided(incoming(drop=("From",), Subject="Lunch?"))
        assert decision.action is Action.SKIP
        assert not has_reason(decision, "no single sender")


class TestThreading:
    def test_missing_message_id_still_replies(self) -> None:
        """Without a Message-ID the reply is still sent; the reasons say it will not be threaded."""
        decision = decided(incoming(drop=("Message-ID",)))
        assert decision.action is Action.REPLY
        assert has_reason(decision, "no well-formed Message-ID")

    def test_garbage_message_id_still_replies(self) -> None:
        """A malformed Message-ID is treated like a missing one."""
        decision = decided(incoming(Message_ID="<not an id>"))
        assert decision.action is Action.REPLY
        assert has_reason(decision, "no well-formed Message-ID")

    def test_answer_to_our_automatic_reply_is_escalated(self) -> None:
        """A person answering our automatic reply gets a person, not a second link."""
        ours = new_message_id("support.example.net")
        decision = decided(
            incoming(In_Reply_To=ours, References=f"<CAF0001@mail.example.com> {ours}")
        )
        assert decision.action is Action.ESCALATE
        assert decision.reasons == (
            f"answers an automatic reply we sent ({ours}); a person should take it from here",
        )


class TestRobustness:
    def test_huge_headers_are_escalated(self) -> None:
        """Billing mail with headers over the size limit goes to a person."""
        decision = decided(incoming(("X-Padding", "x" * 300_000)))
        assert decision.action is Action.ESCALATE
        assert len(decision.reasons) == 1
        assert decision.reasons[0].startswith("headers take 300,")
        assert decision.reasons[0].endswith(
            "over the limit of 256,000: too unusual to answer automatically"
        )

    def test_huge_automated_or_unrelated_mail_is_skipped(self) -> None:
        """Oversized mail that is automated or not billing is skipped like any other."""
        policy = TriagePolicy(("invoice",), MAILBOX, max_header_bytes=1_000)
        padding = ("X-Padding", "x" * 2_000)
        assert decided(incoming(padding, Subject="hello"), policy).action is Action.SKIP
        assert decided(incoming(padding, ("Precedence", "bulk")), policy).action is Action.SKIP

    def test_huge_address_headers_are_refused_unparsed(self) -> None:
        """A From of hundreds of kilobytes is an unparseable sender, answered quickly."""
        decision = decided(incoming(From="a" * 200_000 + "@example.com"))
        assert decision.action is Action.ESCALATE
        assert has_reason(decision, "From cannot be parsed")

    def test_reasons_are_single_short_lines(self) -> None:
        """Header text quoted in a reason cannot break the line or flood the log."""
        decision = decided(incoming(("Auto-Submitted", "auto-replied\r\nX-Injected: " + "y" * 500)))
        assert decision.action is Action.SKIP
        assert all("\n" not in r and "\r" not in r and len(r) < 200 for r in decision.reasons)

    def test_undecodable_subject(self) -> None:
        """A subject in a broken charset or encoding is decoded as far as possible."""
        decision = decided(incoming(Subject="=?x-bogus?B?SW52b2ljZQ==?= =?utf-8?q?=FF?="))
        assert decision.action is Action.REPLY
        assert decision.subject == "Invoice\ufffd"

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "From",
                        "Subject",
                        "Sender",
                        "Return-Path",
                        "Auto-Submitted",
                        "Content-Type",
                        "Authentication-Results",
                        "Message-ID",
                        "References",
                        "List-Id",
                        "Precedence",
                    ]
                ),
                st.text(max_size=80),
            ),
            max_size=8,
        ),
        st.frozensets(st.sampled_from(["INBOX", "UNREAD", "SPAM", "SENT"])),
    )
    def test_any_headers_give_a_decision(
        self, headers: list[tuple[str, str]], labels: frozenset[str]
    ) -> None:
        """Whatever the headers hold, decide returns a decision with reasons and never raises."""
        message = IncomingMessage("m", "t", labels, tuple(headers))
        decision = decided(message)
        if decision.action is Action.REPLY:
            assert decision.sender is not None
            assert matching_keyword(decision.subject, POLICY.keywords) is not None
