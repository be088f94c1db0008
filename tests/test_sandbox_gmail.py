"""The Gmail emulator, driven through the real google-api-python-client wherever the client can go.

Raw urllib is used only where the client would refuse to send the request itself (unknown
parameters, a missing token).
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest
from google.auth.exceptions import RefreshError
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.gmail import GmailEmulator

NOW = 1_790_000_000.0  # a fixed "now" for emulators with a test clock


def make_raw(
    subject: str = "Where is my invoice?",
    *,
    sender: str = "Amy Pond <amy@example.com>",
    to: str = "support@example.com",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    body: str = "Hello.",
    **headers: str,
) -> bytes:
    """An RFC 822 message as bytes; non-ASCII headers come out RFC 2047-encoded."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    if message_id:
        message["Message-ID"] = message_id
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
        message["References"] = in_reply_to
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(body)
    return message.as_bytes(policy=policy.SMTP)


def make_service(emulator: GmailEmulator) -> Any:
    """The real client as the project builds it, refreshing its token against the emulator."""
    credentials = Credentials(  # type: ignore[no-untyped-call]
        token=None,
        refresh_token=emulator.refresh_token,
        client_id="test-client",
        client_secret="test-secret",
        token_uri=emulator.url + "/token",
    )
    return build(
        "gmail",
        "v1",
        credentials=credentials,
        client_options={"api_endpoint": emulator.url},
        static_discovery=True,
        cache_discovery=False,
    )


def raw_request(
    emulator: GmailEmulator, path: str, *, token: str | None = None
) -> tuple[int, dict[str, Any], Any]:
    """A GET the client library could not be made to send; returns status, JSON body, headers."""
    request = urllib.request.Request(emulator.url + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read()), exc.headers


def error_of(exc: HttpError) -> dict[str, Any]:
    """The ``error`` object of an HttpError's body."""
    error: dict[str, Any] = json.loads(exc.content)["error"]
    return error


def send_raw(service: Any, raw: bytes, thread_id: str | None = None) -> dict[str, Any]:
    """messages.send the way the project calls it: raw in the JSON body, not a media upload."""
    body = {"raw": base64.urlsafe_b64encode(raw).decode("ascii")}
    if thread_id:
        body["threadId"] = thread_id
    sent: dict[str, Any] = service.users().messages().send(userId="me", body=body).execute()
    return sent


@pytest.fixture
def gmail(gmail_server: GmailEmulator) -> GmailEmulator:
    """The session's emulator with an empty mailbox and no quota budget."""
    gmail_server.reset()
    gmail_server.quota_units_per_minute = None
    return gmail_server


@pytest.fixture
def service(gmail: GmailEmulator) -> Iterator[Any]:
    """The real Gmail client pointed at the emulator."""
    client = make_service(gmail)
    yield client
    client.close()


@pytest.fixture
def clocked() -> Iterator[tuple[GmailEmulator, list[float]]]:
    """A private emulator whose clock the test moves by assigning to ``now[0]``."""
    now = [NOW]
    with GmailEmulator(clock=lambda: now[0], quota_units_per_minute=12) as emulator:
        yield emulator, now


class TestServer:
    def test_a_client_gone_before_the_answer_is_recorded_without_a_traceback(
        self, gmail: GmailEmulator, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """A request whose client resets the connection before the (slow) answer is recorded, and the server prints no traceback; the next request is served."""
        gmail.inject_fault(Fault(503, method="GET", path=r"/profile$", delay=0.3))
        host, port = gmail.url.removeprefix("http://").rstrip("/").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall(
                b"GET /gmail/v1/users/me/profile HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            time.sleep(0.05)
            # Linger 0: close() resets the connection, as a killed process's kernel does.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.6)  # past the fault's delay: the answer has met the reset socket
        assert [r.path for r in gmail.requests] == ["/gmail/v1/users/me/profile"]
        assert "Traceback" not in capfd.readouterr().err
        status, _, _ = raw_request(gmail, "/gmail/v1/users/me/profile")
        assert status == 401  # served as usual (no token): the server lives on


class TestClientCompatibility:
    def test_client_refreshes_its_token_and_reaches_the_api(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """The unmodified client refreshes at /token and then calls the API with that bearer."""
        profile = service.users().getProfile(userId="me").execute()
        assert profile["emailAddress"] == gmail.address
        token_call, api_call = gmail.requests
        assert (token_call.method, token_call.path) == ("POST", "/token")
        assert token_call.form()["grant_type"] == ["refresh_token"]
        assert api_call.path == "/gmail/v1/users/me/profile"
        assert api_call.headers["authorization"].startswith("Bearer ya29.")

    def test_user_id_may_be_the_address_but_not_another_user(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """userId accepts "me" or the mailbox address; anyone else is delegation denied (403)."""
        assert service.users().labels().list(userId=gmail.address).execute()["labels"]
        with pytest.raises(HttpError) as caught:
            service.users().labels().list(userId="someone@else.test").execute()
        assert caught.value.status_code == 403


class TestAuth:
    def test_missing_token_is_401_unauthenticated(self, gmail: GmailEmulator) -> None:
        """A call with no Authorization header gets Google's 401 with reason "required"."""
        status, body, _ = raw_request(gmail, "/gmail/v1/users/me/profile")
        assert status == 401
        assert body["error"]["status"] == "UNAUTHENTICATED"
        assert body["error"]["errors"][0]["reason"] == "required"

    def test_unknown_token_is_401_with_a_bearer_challenge(self, gmail: GmailEmulator) -> None:
        """A token the emulator never issued gets 401 authError and a WWW-Authenticate header."""
        status, body, headers = raw_request(gmail, "/gmail/v1/users/me/profile", token="nope")
        assert status == 401
        assert body["error"]["errors"][0]["reason"] == "authError"
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]

    def test_issued_token_is_accepted(self, gmail: GmailEmulator) -> None:
        """issue_access_token() gives a bearer the API accepts without a refresh."""
        status, body, _ = raw_request(
            gmail, "/gmail/v1/users/me/profile", token=gmail.issue_access_token()
        )
        assert status == 200
        assert body["emailAddress"] == gmail.address

    def test_expired_access_token_is_refreshed_transparently(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """After tokens expire, the client's 401-refresh-retry gets a new one and succeeds."""
        service.users().getProfile(userId="me").execute()
        gmail.expire_access_tokens()
        service.users().getProfile(userId="me").execute()
        statuses = [(r.path, r.status) for r in gmail.requests]
        assert statuses.count(("/token", 200)) == 2
        assert ("/gmail/v1/users/me/profile", 401) in statuses

    def test_revoked_refresh_token_is_invalid_grant(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """After revoke(), refreshing fails with invalid_grant, which google-auth raises."""
        gmail.revoke()
        with pytest.raises(RefreshError, match="invalid_grant"):
            service.users().getProfile(userId="me").execute()
        assert gmail.requests[-1].status == 400

    def test_token_endpoint_refuses_other_grants(self, gmail: GmailEmulator) -> None:
        """Only the refresh grant is served; anything else is unsupported_grant_type."""
        request = urllib.request.Request(
            gmail.url + "/token", data=b"grant_type=password&client_id=x", method="POST"
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError) as caught:
            opener.open(request, timeout=5)
        with caught.value as response:
            assert json.loads(response.read())["error"] == "unsupported_grant_type"


class TestDiscoveryValidation:
    def test_unknown_query_parameter_is_400(self, gmail: GmailEmulator) -> None:
        """A query parameter the discovery document does not list is refused as Google does."""
        status, body, _ = raw_request(
            gmail, "/gmail/v1/users/me/messages?labelId=INBOX", token=gmail.issue_access_token()
        )
        assert status == 400
        assert body["error"]["status"] == "INVALID_ARGUMENT"
        assert 'Unknown name "labelId"' in body["error"]["message"]

    def test_parameter_of_the_wrong_type_is_400(self, gmail: GmailEmulator) -> None:
        """maxResults must be an unsigned integer and includeSpamTrash a boolean."""
        token = gmail.issue_access_token()
        for path in (
            "/gmail/v1/users/me/messages?maxResults=ten",
            "/gmail/v1/users/me/messages?maxResults=-1",
            "/gmail/v1/users/me/messages?includeSpamTrash=yes",
            "/gmail/v1/users/me/messages/18f0a00000000001?format=html",
        ):
            status, body, _ = raw_request(gmail, path, token=token)
            assert status == 400, path
            assert body["error"]["errors"][0]["reason"] == "invalid"

    def test_unknown_method_is_404_method_not_found(self, gmail: GmailEmulator) -> None:
        """A path no discovery method has answers Google's "Method not found." 404."""
        status, body, _ = raw_request(
            gmail, "/gmail/v1/users/me/mailboxes", token=gmail.issue_access_token()
        )
        assert status == 404
        assert body["error"]["message"] == "Method not found."

    def test_standard_parameters_are_accepted(self, gmail: GmailEmulator) -> None:
        """alt, prettyPrint, quotaUser and fields are every method's parameters."""
        query = "alt=json&prettyPrint=false&quotaUser=q&fields=emailAddress"
        status, _, _ = raw_request(
            gmail, f"/gmail/v1/users/me/profile?{query}", token=gmail.issue_access_token()
        )
        assert status == 200

    def test_xgafv_2_drops_the_errors_array(self, gmail: GmailEmulator) -> None:
        """Gmail's error carries errors[] unless the request asked for $.xgafv=2."""
        token = gmail.issue_access_token()
        path = "/gmail/v1/users/me/messages/18f0a00000000001"
        _, plain, _ = raw_request(gmail, path, token=token)
        _, v2, _ = raw_request(gmail, path + "?%24.xgafv=2", token=token)
        assert "errors" in plain["error"]
        assert "errors" not in v2["error"]
        assert v2["error"]["status"] == "NOT_FOUND"

    def test_unknown_body_field_is_400(self, gmail: GmailEmulator, service: Any) -> None:
        """The client passes any body through; the emulator refuses fields the schema lacks."""
        message_id, _ = gmail.deliver(make_raw())
        body = {"addLabelIdz": ["STARRED"]}
        with pytest.raises(HttpError) as caught:
            service.users().messages().modify(userId="me", id=message_id, body=body).execute()
        assert caught.value.status_code == 400
        assert 'Unknown name "addLabelIdz"' in error_of(caught.value)["message"]

    def test_unimplemented_method_says_so(self, gmail: GmailEmulator, service: Any) -> None:
        """A real method the emulator does not model answers 501 rather than a made-up result."""
        with pytest.raises(HttpError) as caught:
            service.users().messages().trash(userId="me", id="18f0a00000000001").execute()
        assert caught.value.status_code == 501


class TestListing:
    def test_paging_past_100_with_next_page_token(self, gmail: GmailEmulator, service: Any) -> None:
        """The default page is 100, newest first, and nextPageToken leads to the rest."""
        ids = [gmail.deliver(make_raw(f"n{i}"), internal_date_ms=i * 1000)[0] for i in range(130)]
        first = service.users().messages().list(userId="me").execute()
        assert len(first["messages"]) == 100
        assert first["resultSizeEstimate"] == 130
        second = (
            service.users().messages().list(userId="me", pageToken=first["nextPageToken"]).execute()
        )
        assert "nextPageToken" not in second
        listed = [m["id"] for m in first["messages"] + second["messages"]]
        assert listed == ids[::-1]

    def test_paging_survives_earlier_pages_being_marked_read(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """Working through is:unread page by page, marking each read, still reaches every one."""
        for i in range(7):
            gmail.deliver(make_raw(f"n{i}"), internal_date_ms=i * 1000)
        seen: list[str] = []
        token = None
        while True:
            page = (
                service.users()
                .messages()
                .list(userId="me", q="is:unread", maxResults=3, pageToken=token)
                .execute()
            )
            for ref in page.get("messages", []):
                seen.append(ref["id"])
                service.users().messages().modify(
                    userId="me", id=ref["id"], body={"removeLabelIds": ["UNREAD"]}
                ).execute()
            token = page.get("nextPageToken")
            if not token:
                break
        assert len(set(seen)) == 7

    def test_empty_result_has_no_messages_key(self, service: Any) -> None:
        """Like Gmail, an empty listing omits "messages" and says resultSizeEstimate 0."""
        assert service.users().messages().list(userId="me").execute() == {"resultSizeEstimate": 0}

    def test_label_ids_filter_requires_every_label(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """labelIds=[A, B] lists only messages carrying both."""
        both, _ = gmail.deliver(make_raw("a"), label_ids=("INBOX", "STARRED"))
        gmail.deliver(make_raw("b"), label_ids=("INBOX",))
        found = (
            service.users().messages().list(userId="me", labelIds=["INBOX", "STARRED"]).execute()
        )
        assert [m["id"] for m in found["messages"]] == [both]

    def test_threads_list_groups_messages(self, gmail: GmailEmulator, service: Any) -> None:
        """threads.list names each conversation once, newest activity first."""
        _, thread = gmail.deliver(make_raw("Invoice", message_id="<a@x.test>"))
        gmail.deliver(make_raw("Re: Invoice", in_reply_to="<a@x.test>"))
        _, other = gmail.deliver(make_raw("Other"), internal_date_ms=1)
        found = service.users().threads().list(userId="me").execute()
        assert [t["id"] for t in found["threads"]] == [thread, other]


class TestMessagesGet:
    def test_metadata_returns_only_requested_headers_in_message_order(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """format=metadata with metadataHeaders keeps those headers, in the message's order."""
        message_id, _ = gmail.deliver(make_raw(Auto_Submitted="auto-replied"))
        got = (
            service.users()
            .messages()
            .get(userId="me", id=message_id, format="metadata", metadataHeaders=["subject", "From"])
            .execute()
        )
        assert [h["name"] for h in got["payload"]["headers"]] == ["From", "Subject"]
        assert got["payload"]["mimeType"] == "text/plain"
        assert {"id", "threadId", "labelIds", "snippet", "historyId", "internalDate"} <= set(got)
        assert isinstance(got["internalDate"], str)

    def test_metadata_without_names_returns_every_header(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """Without metadataHeaders, every header comes back, repeated ones included."""
        raw = b"Received: a\r\nReceived: b\r\n" + make_raw()
        message_id, _ = gmail.deliver(raw)
        got = service.users().messages().get(userId="me", id=message_id, format="metadata")
        names = [h["name"] for h in got.execute()["payload"]["headers"]]
        assert names[:2] == ["Received", "Received"]
        assert "Subject" in names

    def test_header_values_are_rfc2047_decoded(self, gmail: GmailEmulator, service: Any) -> None:
        """Encoded words in header values come back decoded, as Gmail returns them."""
        raw = make_raw("Rückerstattung für März", sender="Jörg Müller <j@example.de>")
        assert b"=?utf-8?" in raw
        message_id, _ = gmail.deliver(raw)
        got = service.users().messages().get(userId="me", id=message_id, format="metadata")
        headers = {h["name"]: h["value"] for h in got.execute()["payload"]["headers"]}
        assert headers["Subject"] == "Rückerstattung für März"
        assert headers["From"] == "Jörg Müller <j@example.de>"

    def test_raw_header_values_when_asked(self) -> None:
        """decode_header_values=False returns header values exactly as in the message."""
        with GmailEmulator(decode_header_values=False) as emulator:
            message_id, _ = emulator.deliver(make_raw("Rückerstattung"))
            client = make_service(emulator)
            got = client.users().messages().get(userId="me", id=message_id, format="metadata")
            headers = {h["name"]: h["value"] for h in got.execute()["payload"]["headers"]}
            client.close()
        assert headers["Subject"].startswith("=?utf-8?")

    def test_raw_format_round_trips_the_bytes(self, gmail: GmailEmulator, service: Any) -> None:
        """format=raw returns the stored message as base64url, byte for byte."""
        raw = make_raw()
        message_id, _ = gmail.deliver(raw)
        got = service.users().messages().get(userId="me", id=message_id, format="raw").execute()
        assert base64.urlsafe_b64decode(got["raw"]) == raw
        assert "payload" not in got

    def test_full_format_decodes_the_body(self, gmail: GmailEmulator, service: Any) -> None:
        """format=full gives the payload tree with the body's transfer encoding undone."""
        message_id, _ = gmail.deliver(make_raw(body="Grüße aus Köln\n"))
        got = service.users().messages().get(userId="me", id=message_id).execute()
        data = base64.urlsafe_b64decode(got["payload"]["body"]["data"])
        assert data.decode("utf-8") == "Grüße aus Köln\r\n"
        assert got["snippet"] == "Grüße aus Köln"

    def test_malformed_and_unknown_ids(self, gmail: GmailEmulator, service: Any) -> None:
        """A non-hex id is 400 "Invalid id value"; a well-formed unknown id is 404."""
        messages = service.users().messages()
        with pytest.raises(HttpError) as malformed:
            messages.get(userId="me", id="not-an-id").execute()
        with pytest.raises(HttpError) as unknown:
            messages.get(userId="me", id="18f0a00000000001").execute()
        assert (malformed.value.status_code, unknown.value.status_code) == (400, 404)
        assert error_of(unknown.value)["errors"][0] == {
            "message": "Requested entity was not found.",
            "domain": "global",
            "reason": "notFound",
        }


class TestThreading:
    def test_delivered_reply_joins_the_referenced_thread(self, gmail: GmailEmulator) -> None:
        """A reply referencing a message with the same subject (Re: aside) joins its thread."""
        _, thread = gmail.deliver(make_raw("Invoice 42", message_id="<a@x.test>"))
        _, joined = gmail.deliver(make_raw("RE: Invoice  42", in_reply_to="<a@x.test>"))
        assert joined == thread

    def test_delivered_reply_with_another_subject_starts_a_thread(
        self, gmail: GmailEmulator
    ) -> None:
        """References alone are not enough: Gmail also wants the subjects to match."""
        _, thread = gmail.deliver(make_raw("Invoice 42", message_id="<a@x.test>"))
        message_id, other = gmail.deliver(make_raw("Something else", in_reply_to="<a@x.test>"))
        assert other != thread
        assert other == message_id

    def test_sent_reply_joins_the_named_thread(self, gmail: GmailEmulator, service: Any) -> None:
        """threadId plus In-Reply-To/References and a matching subject: the reply joins."""
        _, thread = gmail.deliver(make_raw("Invoice 42", message_id="<a@x.test>"))
        reply = make_raw(
            "Re: Invoice 42", sender=gmail.address, to="amy@example.com", in_reply_to="<a@x.test>"
        )
        sent = send_raw(service, reply, thread)
        assert sent["threadId"] == thread
        assert sent["labelIds"] == ["SENT"]
        (stored,) = gmail.sent_messages()
        assert stored.id == sent["id"] and stored.raw.endswith(reply)
        assert stored.message["In-Reply-To"] == "<a@x.test>"

    def test_sent_reply_without_references_starts_a_thread(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """Naming the threadId is not enough if the headers do not reference the thread."""
        _, thread = gmail.deliver(make_raw("Invoice 42", message_id="<a@x.test>"))
        sent = send_raw(service, make_raw("Re: Invoice 42", to="amy@example.com"), thread)
        assert sent["threadId"] != thread

    def test_sent_reply_without_thread_id_starts_a_thread(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """Correct headers without threadId: Gmail starts a new thread in the sender's mailbox."""
        _, thread = gmail.deliver(make_raw("Invoice 42", message_id="<a@x.test>"))
        reply = make_raw("Re: Invoice 42", to="amy@example.com", in_reply_to="<a@x.test>")
        assert send_raw(service, reply)["threadId"] != thread

    def test_send_fills_in_a_message_id(self, gmail: GmailEmulator, service: Any) -> None:
        """A message sent without Message-ID gets one, so replies to it can thread."""
        send_raw(service, make_raw("Hello", to="amy@example.com"))
        assert gmail.sent_messages()[0].message["Message-ID"].endswith("@mail.gmail.com>")

    def test_send_needs_a_recipient_and_a_raw(self, service: Any) -> None:
        """No recipient, or no raw at all, is refused with 400 as Gmail does."""
        messages = service.users().messages()
        with pytest.raises(HttpError) as no_recipient:
            send_raw(service, b"Subject: hi\r\n\r\nbody\r\n")
        with pytest.raises(HttpError) as no_raw:
            messages.send(userId="me", body={}).execute()
        assert error_of(no_recipient.value)["message"] == "Recipient address required"
        assert no_raw.value.status_code == 400

    def test_mail_to_oneself_lands_in_the_inbox_too(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """Sending to the mailbox's own address gives one message labelled SENT, INBOX, UNREAD."""
        sent = send_raw(service, make_raw("Loop?", to=gmail.address))
        assert sent["labelIds"] == ["INBOX", "SENT", "UNREAD"]


class TestLabels:
    def test_create_label_and_refuse_a_duplicate(self, gmail: GmailEmulator, service: Any) -> None:
        """labels.create gives Label_N; the same name in other case is 409 "exists or conflicts"."""
        labels = service.users().labels()
        created = labels.create(userId="me", body={"name": "Billing/Replied"}).execute()
        assert created["id"] == gmail.label_id("billing/replied") == "Label_1"
        with pytest.raises(HttpError) as caught:
            labels.create(userId="me", body={"name": "billing/REPLIED"}).execute()
        assert caught.value.status_code == 409
        assert error_of(caught.value)["status"] == "ABORTED"

    def test_system_label_names_are_reserved(self, service: Any) -> None:
        """A user label may not be called INBOX (Gmail: 400 "Invalid label name")."""
        with pytest.raises(HttpError) as caught:
            service.users().labels().create(userId="me", body={"name": "Inbox"}).execute()
        assert caught.value.status_code == 400

    def test_modify_adds_and_removes(self, gmail: GmailEmulator, service: Any) -> None:
        """messages.modify changes exactly the labels asked, and answers the new set."""
        label = gmail.create_label("Billing/Replied")
        message_id, thread = gmail.deliver(make_raw())
        result = (
            service.users()
            .messages()
            .modify(
                userId="me",
                id=message_id,
                body={"addLabelIds": [label], "removeLabelIds": ["UNREAD"]},
            )
            .execute()
        )
        assert result["labelIds"] == sorted(["INBOX", label])
        assert gmail.message_label_names(message_id) == {"INBOX", "Billing/Replied"}
        assert gmail.thread_label_names(thread) == {"INBOX", "Billing/Replied"}

    def test_modify_refuses_unknown_and_fixed_labels(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """An unknown label id, or SENT, is 400 "Invalid label: X"; nothing changes."""
        message_id, _ = gmail.deliver(make_raw())
        messages = service.users().messages()
        for body in ({"addLabelIds": ["Label_99"]}, {"removeLabelIds": ["SENT"]}, {}):
            with pytest.raises(HttpError) as caught:
                messages.modify(userId="me", id=message_id, body=body).execute()
            assert caught.value.status_code == 400
        assert gmail.message_label_names(message_id) == {"INBOX", "UNREAD"}
        assert error_of(caught.value)["message"] == "No label add or removes specified"

    def test_thread_modify_and_batch_modify(self, gmail: GmailEmulator, service: Any) -> None:
        """threads.modify changes every message of the thread; batchModify every listed one."""
        first, thread = gmail.deliver(make_raw("Invoice", message_id="<a@x.test>"))
        second, _ = gmail.deliver(make_raw("Re: Invoice", in_reply_to="<a@x.test>"))
        lone, _ = gmail.deliver(make_raw("Other"))
        users = service.users()
        users.threads().modify(userId="me", id=thread, body={"addLabelIds": ["STARRED"]}).execute()
        users.messages().batchModify(
            userId="me", body={"ids": [first, lone], "removeLabelIds": ["INBOX"]}
        ).execute()
        assert gmail.message_label_names(first) == {"UNREAD", "STARRED"}
        assert gmail.message_label_names(second) == {"INBOX", "UNREAD", "STARRED"}
        assert gmail.message_label_names(lone) == {"UNREAD"}

    def test_threads_get_lists_messages_oldest_first(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """threads.get returns the conversation in order, with metadata headers if asked."""
        first, thread = gmail.deliver(make_raw("Invoice", message_id="<a@x.test>"))
        second, _ = gmail.deliver(make_raw("Re: Invoice", in_reply_to="<a@x.test>"))
        got = (
            service.users()
            .threads()
            .get(userId="me", id=thread, format="metadata", metadataHeaders=["Subject"])
            .execute()
        )
        assert [m["id"] for m in got["messages"]] == [first, second]
        assert got["messages"][1]["payload"]["headers"] == [
            {"name": "Subject", "value": "Re: Invoice"}
        ]


class TestHistory:
    def test_changes_after_the_start_id_in_order(self, gmail: GmailEmulator, service: Any) -> None:
        """history.list returns what happened after startHistoryId, by type."""
        start = service.users().getProfile(userId="me").execute()["historyId"]
        message_id, _ = gmail.deliver(make_raw())
        service.users().messages().modify(
            userId="me", id=message_id, body={"removeLabelIds": ["UNREAD"]}
        ).execute()
        got = service.users().history().list(userId="me", startHistoryId=start).execute()
        kinds = [
            next(k for k in record if k not in ("id", "messages")) for record in got["history"]
        ]
        assert kinds == ["messagesAdded", "labelsRemoved"]
        assert got["history"][1]["labelsRemoved"][0]["labelIds"] == ["UNREAD"]
        assert int(got["historyId"]) == gmail.history_id > int(start)

    def test_history_types_filter(self, gmail: GmailEmulator, service: Any) -> None:
        """historyTypes=[messageAdded] leaves label changes out."""
        start = str(gmail.history_id)
        message_id, _ = gmail.deliver(make_raw())
        service.users().messages().modify(
            userId="me", id=message_id, body={"addLabelIds": ["STARRED"]}
        ).execute()
        got = (
            service.users()
            .history()
            .list(userId="me", startHistoryId=start, historyTypes=["messageAdded"])
            .execute()
        )
        assert len(got["history"]) == 1 and "messagesAdded" in got["history"][0]

    def test_expired_start_id_is_404(self, gmail: GmailEmulator, service: Any) -> None:
        """A startHistoryId older than the retained log is 404, Gmail's cue for a full sync."""
        start = str(gmail.history_id)
        gmail.deliver(make_raw())
        gmail.expire_history()
        with pytest.raises(HttpError) as caught:
            service.users().history().list(userId="me", startHistoryId=start).execute()
        assert caught.value.status_code == 404
        fresh = service.users().history().list(userId="me", startHistoryId=str(gmail.history_id))
        assert "history" not in fresh.execute()

    def test_start_id_is_required(self, service: Any) -> None:
        """Without startHistoryId Gmail answers 400 "Missing/invalid parameter"."""
        with pytest.raises(HttpError) as caught:
            service.users().history().list(userId="me").execute()
        assert caught.value.status_code == 400


class TestSearch:
    @pytest.fixture
    def mailbox(self, gmail: GmailEmulator) -> dict[str, str]:
        """A small mailbox; names map to message ids."""
        replied = gmail.create_label("Billing/Replied")
        gmail.create_label("Needs human")
        five_days_ago = int((time.time() - 5 * 86400) * 1000)
        deliver = gmail.deliver
        return {
            "invoice": deliver(make_raw("Invoice for March", message_id="<inv@x.test>"))[0],
            "receipt": deliver(
                make_raw("Your receipt", sender="bob@shop.test"),
                label_ids=("INBOX",),
                internal_date_ms=five_days_ago,
            )[0],
            "replied": deliver(
                make_raw("Refund request", body="cancel my plan"), label_ids=("INBOX", replied)
            )[0],
            "german": deliver(make_raw("Rückerstattung bitte"))[0],
            "spam": deliver(make_raw("Invoice winner"), label_ids=("SPAM",))[0],
        }

    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            ("is:unread in:inbox", {"invoice", "german"}),
            ("is:read", {"receipt", "replied"}),
            ("in:inbox -label:billing-replied", {"invoice", "receipt", "german"}),
            ("label:Billing/Replied", {"replied"}),
            ('label:"billing replied"', {"replied"}),
            ("subject:(invoice OR receipt)", {"invoice", "receipt"}),
            ('subject:"for march"', {"invoice"}),
            ("subject:march", {"invoice"}),
            ("subject:mar", set()),
            ("from:bob@shop.test", {"receipt"}),
            ("from:shop.test", {"receipt"}),
            ("from:amy", {"invoice", "replied", "german"}),
            ("rfc822msgid:<inv@x.test>", {"invoice"}),
            ("rfc822msgid:inv@x.test", {"invoice"}),
            ("subject:rückerstattung", {"german"}),
            ("CANCEL", {"replied"}),
            ("-{invoice refund} in:inbox", {"receipt", "german"}),
            ("invoice", {"invoice"}),
            ("invoice in:anywhere", {"invoice", "spam"}),
            ("in:spam", {"spam"}),
            ("older_than:2d", {"receipt"}),
            ("newer_than:2d subject:refund", {"replied"}),
            ("(receipt OR refund) -is:unread", {"receipt", "replied"}),
            ("label:needs-human", set()),
            ("label:nonexistent", set()),
            ("", {"invoice", "receipt", "replied", "german"}),
            ("invoice AND march", {"invoice"}),
            ("NOT is:unread", {"receipt", "replied"}),
            ("refund - cancel", {"replied"}),
        ],
    )
    def test_query(
        self,
        gmail: GmailEmulator,
        service: Any,
        mailbox: dict[str, str],
        query: str,
        expected: set[str],
    ) -> None:
        """Each q selects exactly the expected messages (Spam hidden unless asked for)."""
        found = service.users().messages().list(userId="me", q=query).execute()
        ids = {m["id"] for m in found.get("messages", [])}
        assert {name for name, message_id in mailbox.items() if message_id in ids} == expected

    def test_include_spam_trash(self, gmail: GmailEmulator, service: Any) -> None:
        """includeSpamTrash lists Spam and Trash too."""
        gmail.deliver(make_raw(), label_ids=("TRASH",))
        listed = service.users().messages().list(userId="me", includeSpamTrash=True).execute()
        assert listed["resultSizeEstimate"] == 1
        assert service.users().messages().list(userId="me").execute()["resultSizeEstimate"] == 0

    def test_relative_dates_use_the_emulator_clock(
        self, clocked: tuple[GmailEmulator, list[float]]
    ) -> None:
        """newer_than/after are measured against the emulator's clock and internalDate."""
        emulator, now = clocked
        emulator.quota_units_per_minute = None
        old, _ = emulator.deliver(make_raw("old"), internal_date_ms=int((NOW - 3 * 86400) * 1000))
        new, _ = emulator.deliver(make_raw("new"))
        client = make_service(emulator)
        try:

            def ids(q: str) -> set[str]:
                found = client.users().messages().list(userId="me", q=q).execute()
                return {m["id"] for m in found.get("messages", [])}

            assert ids("newer_than:2d") == {new}
            assert ids("older_than:2d") == {old}
            assert ids(f"after:{int(NOW) - 86400}") == {new}
            assert ids("before:2026/09/20") == {old}
            assert ids("after:2026/09/20") == {new}
            now[0] += 3 * 86400
            assert ids("newer_than:2d") == set()
        finally:
            client.close()


class TestFaultsAndQuota:
    def test_injected_429_reaches_the_client_with_retry_after(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """An injected 429 arrives as HttpError 429 in Google's shape, Retry-After intact."""
        retry_after = {"Retry-After": "7"}
        fault = Fault(429, path="/messages$", reason="userRateLimitExceeded", headers=retry_after)
        gmail.inject_fault(fault)
        with pytest.raises(HttpError) as caught:
            service.users().messages().list(userId="me").execute()
        assert caught.value.status_code == 429
        assert caught.value.resp["retry-after"] == "7"
        error = error_of(caught.value)
        assert error["status"] == "RESOURCE_EXHAUSTED"
        assert error["errors"][0]["reason"] == "userRateLimitExceeded"
        assert error["errors"][0]["domain"] == "usageLimits"
        assert service.users().messages().list(userId="me").execute()["resultSizeEstimate"] == 0

    def test_injected_fault_default_reason_follows_the_status(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """Without a reason, a 503 fault says backendError / UNAVAILABLE like Google."""
        gmail.inject_fault(Fault(503, path="/profile$"))
        with pytest.raises(HttpError) as caught:
            service.users().getProfile(userId="me").execute()
        assert error_of(caught.value)["errors"][0]["reason"] == "backendError"
        assert error_of(caught.value)["status"] == "UNAVAILABLE"

    def test_units_are_counted_per_method(self, gmail: GmailEmulator, service: Any) -> None:
        """Units follow Gmail's table: profile 1, list 5, get 5, send 100, history 2."""
        message_id, _ = gmail.deliver(make_raw())
        users = service.users()
        users.getProfile(userId="me").execute()
        users.messages().list(userId="me").execute()
        users.messages().get(userId="me", id=message_id).execute()
        users.history().list(userId="me", startHistoryId=str(gmail.history_id)).execute()
        raw = base64.urlsafe_b64encode(make_raw(to="x@example.com")).decode()
        users.messages().send(userId="me", body={"raw": raw}).execute()
        assert gmail.units_used == 1 + 5 + 5 + 2 + 100

    def test_quota_budget_answers_429_until_the_window_slides(
        self, clocked: tuple[GmailEmulator, list[float]]
    ) -> None:
        """Past quota_units_per_minute, calls get 429 rateLimitExceeded with Retry-After."""
        emulator, now = clocked
        client = make_service(emulator)
        try:
            messages = client.users().messages()
            messages.list(userId="me").execute()
            now[0] += 20
            messages.list(userId="me").execute()
            with pytest.raises(HttpError) as caught:
                messages.list(userId="me").execute()
            assert caught.value.status_code == 429
            assert caught.value.resp["retry-after"] == "40"
            error = error_of(caught.value)
            assert error["errors"][0] == {
                "message": error["message"],
                "domain": "usageLimits",
                "reason": "rateLimitExceeded",
            }
            assert emulator.units_used == 10
            now[0] += 40
            messages.list(userId="me").execute()
        finally:
            client.close()


class TestConcurrency:
    def test_parallel_clients_never_share_an_id(self, gmail: GmailEmulator) -> None:
        """Sends from several threads at once all land, with distinct ids and history ids."""

        def send_five(worker: int) -> list[str]:
            client = make_service(gmail)
            try:
                raws = [make_raw(f"w{worker} n{i}", to="x@example.com") for i in range(5)]
                return [send_raw(client, raw)["id"] for raw in raws]
            finally:
                client.close()

        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = [i for batch in pool.map(send_five, range(4)) for i in batch]
        sent = gmail.sent_messages()
        assert len(set(ids)) == len(sent) == 20
        assert len({m.history_id for m in sent}) == 20


class TestInspection:
    def test_writes_are_the_non_get_api_calls(self, gmail: GmailEmulator, service: Any) -> None:
        """writes() lists what could change the mailbox: not reads, not token refreshes."""
        message_id, _ = gmail.deliver(make_raw())
        service.users().messages().get(userId="me", id=message_id).execute()
        assert gmail.writes() == []
        service.users().messages().modify(
            userId="me", id=message_id, body={"addLabelIds": ["STARRED"]}
        ).execute()
        assert [w.path for w in gmail.writes()] == [
            f"/gmail/v1/users/me/messages/{message_id}/modify"
        ]

    def test_sent_times_say_when_and_where_each_message_was_sent(
        self, gmail: GmailEmulator, service: Any
    ) -> None:
        """sent_times() gives each SENT message's id, thread and internalDate, as
        sent_messages() does, oldest first; received mail is not in it."""
        _, thread = gmail.deliver(make_raw("Invoice 42", message_id="<a@x.test>"))
        reply = make_raw(
            "Re: Invoice 42", sender=gmail.address, to="amy@example.com", in_reply_to="<a@x.test>"
        )
        send_raw(service, reply, thread)
        send_raw(service, make_raw("Hello", sender=gmail.address, to="bob@example.com"))

        expected = [(m.id, m.thread_id, m.internal_date_ms) for m in gmail.sent_messages()]
        assert gmail.sent_times() == expected
        assert [thread_id for _, thread_id, _ in expected][:1] == [thread]
        assert len(expected) == 2

    def test_requests_record_when_they_arrived(
        self, gmail: GmailEmulator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each recorded request carries the time it arrived, before the emulator's latency."""
        monkeypatch.setattr(gmail, "latency", 0.3)
        before = time.time()
        raw_request(gmail, "/gmail/v1/users/me/profile")
        answered = time.time()
        [request] = gmail.requests
        assert before <= request.received <= answered - 0.3

    def test_reset_empties_the_mailbox(self, gmail: GmailEmulator) -> None:
        """reset() forgets mail, labels, history and units."""
        gmail.create_label("X")
        gmail.deliver(make_raw())
        gmail.reset()
        with pytest.raises(KeyError):
            gmail.label_id("X")
        assert gmail.sent_messages() == [] and gmail.units_used == 0
