"""A Gmail API emulator: one mailbox, served over HTTP for the real google-api-python-client.

Point the client at it with ``client_options={"api_endpoint": emulator.url}`` and give
``google.oauth2.credentials.Credentials`` the token URI ``emulator.url + "/token"``; nothing else
changes. Every API request is checked against the discovery document the installed client ships
(method, path, query parameters and their types, body fields), so the emulator answers only what
the real API would accept. Errors come in Google's JSON shape.

What it models, and why each piece is here:

* OAuth: a refresh grant at ``/token`` and bearer tokens on every call, so credential refresh,
  expiry and revocation can be exercised (:meth:`GmailEmulator.revoke`,
  :meth:`GmailEmulator.expire_access_tokens`). A fault injected at ``/token`` answers as the
  token endpoint fails, not as the API does.
* The mailbox: raw RFC 822 messages with labels, threads joined by Gmail's rule (a reply joins
  the thread whose message it references only if the normalised subjects agree), a history log
  whose ids grow with gaps, and :meth:`GmailEmulator.expire_history` for the 404 a stale
  ``startHistoryId`` gets.
* Drafts: ``drafts.create/get/list/send/delete``. A draft's message carries only the DRAFT label,
  joins a thread by the same rule as a sent message, shows in threads.get and in searches
  (``in:drafts``, ``rfc822msgid:``) but not in SENT; sending it replaces it with a new message.
* Search: the ``q`` language in :mod:`billing_responder.sandbox.gmail_query`.
* Quota: Gmail's per-method units, and a per-minute budget that answers 429 when exceeded.

Beside this module: :mod:`~billing_responder.sandbox.gmail_api` (routes, parameter checks and
error bodies from the discovery document) and :mod:`~billing_responder.sandbox.gmail_message`
(one message: its parse and how each ``format`` renders it).

Header values in ``payload.headers`` are returned RFC 2047-decoded, as Gmail does; pass
``decode_header_values=False`` to get them raw and test a client against both.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses, make_msgid
from typing import Any

from billing_responder.sandbox import gmail_api as api
from billing_responder.sandbox import gmail_query
from billing_responder.sandbox._http import EmulatorServer, Fault, RecordedRequest, Response
from billing_responder.sandbox.gmail_api import GmailApiError
from billing_responder.sandbox.gmail_message import (
    MailboxMessage,
    StoredMessage,
    bare_message_id,
    normalised_subject,
    parse,
)
from billing_responder.sandbox.gmail_oauth import (
    AUTHORIZE_PATHS,
    GoogleOAuth,
    token_fault_response,
)

__all__ = ["SYSTEM_LABELS", "GmailEmulator", "StoredDraft", "StoredMessage"]

#: Gmail's system labels. Their names are their ids.
SYSTEM_LABELS = (
    "INBOX", "SPAM", "TRASH", "UNREAD", "STARRED", "IMPORTANT", "SENT", "DRAFT", "CHAT",
    "CATEGORY_PERSONAL", "CATEGORY_SOCIAL", "CATEGORY_PROMOTIONS", "CATEGORY_UPDATES",
    "CATEGORY_FORUMS",
)  # fmt: skip
# Gmail refuses to add or remove these through modify ("Invalid label: SENT").
_FIXED_LABELS = frozenset({"SENT", "DRAFT", "CHAT"})
# Names Gmail keeps for itself beyond the system label ids ("Invalid label name").
_RESERVED_NAMES = frozenset({"drafts", "chats", "muted", "sent mail", "all mail"})
# Search words that name system labels (``in:drafts``, ``is:starred``...).
_LABEL_WORDS = {label.lower(): label for label in SYSTEM_LABELS} | {
    "drafts": "DRAFT", "chats": "CHAT", "sent": "SENT", "star": "STARRED",
}  # fmt: skip

ACCESS_TOKEN_LIFETIME = 3599
DEFAULT_SCOPE = "https://www.googleapis.com/auth/gmail.modify"
_MAX_THREAD_LENGTH = 100  # Gmail starts a new conversation after 100 messages
_HISTORY_STEP = 3  # history ids grow with gaps in Gmail; clients must not assume +1
_ID = re.compile(r"[0-9a-fA-F]{1,16}")

# -- the emulator --------------------------------------------------------------------------------


@dataclass
class _Label:
    id: str
    name: str
    type: str  # "system" | "user"

    def resource(self) -> dict[str, str]:
        resource = {"id": self.id, "name": self.name, "type": self.type}
        if self.type == "user":
            resource |= {"messageListVisibility": "show", "labelListVisibility": "labelShow"}
        return resource


@dataclass(frozen=True)
class StoredDraft:
    """A draft as the mailbox holds it, for tests: its own id and its (DRAFT-labelled) message."""

    id: str
    message: StoredMessage


@dataclass(frozen=True)
class _HistoryRecord:
    id: int
    kind: str  # "messagesAdded" | "labelsAdded" | "labelsRemoved"
    message: dict[str, Any]  # id, threadId, labelIds after the change
    changed: tuple[str, ...] = ()


@dataclass
class _Call:
    """One validated API request as a handler sees it."""

    params: dict[str, Any]
    path: dict[str, str]
    body: dict[str, Any]


def _newest_first(message: MailboxMessage) -> api.Key:
    return (-message.internal_date_ms, -int(message.id, 16))


def _ok(payload: object) -> Response:
    return Response.json(200, payload)


def _decode_raw(encoded: object) -> bytes:
    """A ``raw`` field's RFC 822 bytes (base64url, padding optional), or Gmail's 400."""
    text = str(encoded)
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raise api.bad_request(
            "Invalid value at 'message.raw' (TYPE_BYTES)", reason="invalid"
        ) from None


class GmailEmulator(EmulatorServer):
    """One Gmail mailbox behind the Gmail REST API, on 127.0.0.1.

    Seed it with :meth:`deliver` and :meth:`create_label`; inspect it with :meth:`sent_messages`,
    :meth:`sent_times`, :meth:`drafts`, :meth:`message`, :meth:`message_label_names`,
    :meth:`thread_label_names`, :meth:`label_id`, :meth:`writes` and :attr:`units_used`.
    ``clock`` (seconds since the epoch) drives ``internalDate``, ``newer_than:``, token expiry and
    the quota window, so tests can move time.
    """

    name = "gmail"

    def __init__(
        self,
        *,
        address: str = "support@example.com",
        send_as_aliases: Sequence[str] = (),
        latency: float = 0.0,
        quota_units_per_minute: int | None = None,
        refresh_token: str = "sandbox-refresh-token",  # noqa: S107 - a sandbox value, not a secret
        clock: Callable[[], float] = time.time,
        decode_header_values: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port, latency=latency)
        self.address = address
        self.send_as_aliases = list(send_as_aliases)  # "Send mail as" addresses besides our own
        self.refresh_token = refresh_token
        self.quota_units_per_minute = quota_units_per_minute
        self.decode_header_values = decode_header_values
        self._clock = clock
        self._access_tokens: dict[str, float] = {}  # token -> expiry (clock seconds)
        self._token_lock = threading.Lock()
        self._reset_state()

    def _reset_state(self) -> None:
        with self._lock:
            self._revoked = False
            # Consent screen, code exchange and service accounts (gmail_oauth.py).
            self.oauth = GoogleOAuth(self)
            #: What the refresh token was granted at consent (space-separated scopes).
            self.granted_scope = DEFAULT_SCOPE
            self._messages: dict[str, MailboxMessage] = {}
            self._threads: dict[str, list[str]] = {}
            self._drafts: dict[str, str] = {}  # draft id -> the id of the message it holds
            self._labels: dict[str, _Label] = {i: _Label(i, i, "system") for i in SYSTEM_LABELS}
            self._next_label = 1
            self._next_id = 0x18F0A00000000000
            self._history_id = 1000
            self._history_floor = self._history_id
            self._history: list[_HistoryRecord] = []
            self._quota_window: deque[tuple[float, int]] = deque()
            self._units_used = 0

    def reset(self) -> None:
        """Forget requests, faults, mail, labels, history and quota; issued tokens stay valid."""
        super().reset()
        self._reset_state()

    # -- seeding -----------------------------------------------------------------------------

    def deliver(
        self,
        raw: bytes,
        *,
        label_ids: Sequence[str] = ("INBOX", "UNREAD"),
        internal_date_ms: int | None = None,
    ) -> tuple[str, str]:
        """Receive ``raw`` as Gmail would; returns (message id, thread id)."""
        with self._lock:
            unknown = [label for label in label_ids if label not in self._labels]
            if unknown:
                raise ValueError(f"unknown label ids {unknown}; create user labels first")
            stored = self._store(raw, set(label_ids), internal_date_ms, joinable=None)
            return stored.id, stored.thread_id

    def create_label(self, name: str) -> str:
        """Create a user label and return its id (``Label_1``, ``Label_2``...)."""
        with self._lock:
            return self._create_label(name).id

    # -- inspection --------------------------------------------------------------------------

    def sent_messages(self) -> list[StoredMessage]:
        """Every message labelled SENT (sent through the API, or seeded so), oldest first."""
        with self._lock:
            found = [m for m in self._messages.values() if "SENT" in m.label_ids]
            return [m.snapshot() for m in found]

    def sent_times(self) -> list[tuple[str, str, int]]:
        """``(message id, thread id, internalDate ms)`` of every message labelled SENT, oldest
        first: what :meth:`sent_messages` tells of when and where each was sent, without parsing
        every message again (a benchmark counts 10,000 replies)."""
        with self._lock:
            return [
                (m.id, m.thread_id, m.internal_date_ms)
                for m in self._messages.values()
                if "SENT" in m.label_ids
            ]

    def drafts(self) -> list[StoredDraft]:
        """Every draft (created through the API and not yet sent or deleted), oldest first."""
        with self._lock:
            return [StoredDraft(d, self._messages[m].snapshot()) for d, m in self._drafts.items()]

    def message(self, message_id: str) -> StoredMessage:
        """The stored message ``message_id``; KeyError when there is none."""
        with self._lock:
            return self._messages[message_id].snapshot()

    def message_label_names(self, message_id: str) -> frozenset[str]:
        """Names of the labels on one message (system labels are named by their ids)."""
        with self._lock:
            return frozenset(self._labels[i].name for i in self._messages[message_id].label_ids)

    def thread_label_names(self, thread_id: str) -> frozenset[str]:
        """Names of the labels on any message of a thread, as Gmail shows a conversation."""
        with self._lock:
            ids = self._threads[thread_id]
            return frozenset().union(*(self.message_label_names(i) for i in ids))

    def label_id(self, name: str) -> str:
        """The id of the label called ``name`` (case-insensitive); KeyError when there is none."""
        with self._lock:
            for label in self._labels.values():
                if label.name.casefold() == name.casefold():
                    return label.id
        raise KeyError(f"no label named {name!r}")

    def writes(self) -> list[RecordedRequest]:
        """Requests that could change the mailbox: every non-GET API call (``/token`` excluded)."""
        return [r for r in self.requests if r.method != "GET" and r.path != "/token"]

    @property
    def units_used(self) -> int:
        """Quota units charged since the last reset."""
        with self._lock:
            return self._units_used

    @property
    def history_id(self) -> int:
        """The mailbox's current history id."""
        with self._lock:
            return self._history_id

    # -- knobs -----------------------------------------------------------------------------------

    def issue_access_token(self) -> str:
        """A valid bearer token, as if a refresh had just happened."""
        token = f"ya29.sandbox-{secrets.token_urlsafe(24)}"
        with self._token_lock:
            self._access_tokens[token] = self._clock() + ACCESS_TOKEN_LIFETIME
        return token

    def expire_access_tokens(self) -> None:
        """Make every issued access token expired, as an hour passing would."""
        with self._token_lock:
            self._access_tokens.clear()

    def revoke(self) -> None:
        """Revoke the refresh token and its access tokens, as a user removing access does."""
        with self._lock:
            self._revoked = True
        self.expire_access_tokens()

    def expire_history(self) -> None:
        """Drop the history log, so any older ``startHistoryId`` gets Gmail's 404."""
        with self._lock:
            self._history.clear()
            self._history_floor = self._history_id

    # -- HTTP ----------------------------------------------------------------------------------

    def error(self, fault: Fault, request: RecordedRequest) -> Response:
        """An injected fault in Google's error shape; ``fault.reason`` becomes errors[0].reason.

        At ``/token`` the fault stands in for Google's OAuth server, not the Gmail API, and
        answers in that server's shape (:func:`~.gmail_oauth.token_fault_response`).
        """
        if request.path == "/token":
            return token_fault_response(fault)
        message = None if fault.message == Fault.message else fault.message
        reason = fault.reason or None
        domain = "usageLimits" if reason in api.USAGE_LIMIT_REASONS else "global"
        error = GmailApiError(
            fault.status, message, reason=reason, domain=domain, headers=fault.headers
        )
        return error.response()

    def route(self, request: RecordedRequest) -> Response:
        if request.path == "/token":
            return self.oauth.token(request, refresh=self._token)
        if request.path in AUTHORIZE_PATHS:
            return self.oauth.authorize(request)
        try:
            return self._api(request)
        except GmailApiError as exc:
            return exc.response(errors_array=request.param("$.xgafv") != "2")

    def _api(self, request: RecordedRequest) -> Response:
        route, path = api.match(request.method, request.path)
        self._authenticate(request)
        call = _Call(
            api.validate_query(route, request.query), path, api.validate_body(route, request.body)
        )
        user = path.get("userId", "me")
        if user != "me" and user.casefold() != self.address.casefold():
            raise GmailApiError(403, f"Delegation denied for {self.address}")
        handler = _HANDLERS.get(route.name)
        if handler is None:
            raise GmailApiError(501, f"The Gmail emulator does not implement users.{route.name}.")
        with self._lock:
            self._charge(api.QUOTA_UNITS.get(route.name, 5))
            return handler(self, call)

    def _token(self, request: RecordedRequest) -> Response:
        form = {k: v[0] for k, v in request.form().items()} if request.method == "POST" else {}
        grant = form.get("grant_type", "")

        def refuse(error: str, description: str) -> Response:
            return Response.json(400, {"error": error, "error_description": description})

        if grant != "refresh_token":
            return refuse("unsupported_grant_type", f"Invalid grant_type: {grant}")
        if not form.get("client_id"):
            return refuse("invalid_request", "Could not determine client ID from request.")
        with self._lock:
            valid = not self._revoked and form.get("refresh_token") == self.refresh_token
        if not valid:
            return refuse("invalid_grant", "Token has been expired or revoked.")
        scope = self._refreshed_scope(form.get("scope", ""))
        if scope is None:
            return refuse("invalid_scope", "Bad Request")
        return Response.json(
            200,
            {
                "access_token": self.issue_access_token(),
                "expires_in": ACCESS_TOKEN_LIFETIME,
                "scope": scope,
                "token_type": "Bearer",
            },
        )

    def _refreshed_scope(self, requested: str) -> str | None:
        """The scope a refreshed access token carries: the one asked for when the grant covers
        it, the whole grant when none was asked for; None when more was asked for than was
        granted, which Google refuses with ``invalid_scope`` (RFC 6749 section 6)."""
        with self._lock:
            granted = self.granted_scope
        if not requested.split():
            return granted
        return requested if set(requested.split()) <= set(granted.split()) else None

    def _authenticate(self, request: RecordedRequest) -> None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        token = token or request.param("access_token") or request.param("oauth_token")
        location = ("Authorization", "header")
        if not token:
            raise GmailApiError(401, api.MISSING_CREDENTIALS, reason="required", location=location)
        with self._token_lock:
            expiry = self._access_tokens.get(token)
        if expiry is None or expiry <= self._clock():
            challenge = 'Bearer realm="https://accounts.google.com/", error="invalid_token"'
            raise GmailApiError(
                401,
                api.INVALID_CREDENTIALS,
                reason="authError",
                location=location,
                headers={"WWW-Authenticate": challenge},
            )

    def _charge(self, units: int) -> None:
        now = self._clock()
        window = self._quota_window
        while window and window[0][0] <= now - 60:
            window.popleft()
        budget = self.quota_units_per_minute
        if budget is not None and sum(u for _, u in window) + units > budget:
            excess = sum(u for _, u in window) + units - budget
            freed, wait = 0, 60.0
            for stamp, spent in window:
                freed += spent
                if freed >= excess:
                    wait = stamp + 60 - now
                    break
            retry = {"Retry-After": str(max(1, math.ceil(wait)))}
            raise GmailApiError(
                429,
                api.QUOTA_MESSAGE,
                reason="rateLimitExceeded",
                domain="usageLimits",
                headers=retry,
            )
        window.append((now, units))
        self._units_used += units

    # -- state changes (callers hold the lock) --------------------------------------------------

    def _bump_history(self) -> int:
        self._history_id += _HISTORY_STEP
        return self._history_id

    def _new_id(self) -> str:
        self._next_id += 1 + secrets.randbelow(4096)
        return f"{self._next_id:016x}"

    def _create_label(self, name: str) -> _Label:
        name = name.strip()
        if not name or name.upper() in SYSTEM_LABELS or name.casefold() in _RESERVED_NAMES:
            raise api.bad_request("Invalid label name")
        key = re.sub(r"[\"&()\-/{}|]", "-", name.casefold())
        if any(
            re.sub(r"[\"&()\-/{}|]", "-", lab.name.casefold()) == key
            for lab in self._labels.values()
        ):
            raise GmailApiError(409, "Label name exists or conflicts", reason="aborted")
        label = _Label(f"Label_{self._next_label}", name, "user")
        self._next_label += 1
        self._labels[label.id] = label
        return label

    def _store(
        self,
        raw: bytes,
        labels: set[str],
        internal_date_ms: int | None,
        joinable: Sequence[str] | None,
    ) -> MailboxMessage:
        """Add a message; it may join one of the ``joinable`` threads (None: any thread)."""
        message = MailboxMessage.receive(
            self._new_id(),
            raw,
            label_ids=labels,
            internal_date_ms=int(self._clock() * 1000)
            if internal_date_ms is None
            else internal_date_ms,
            history_id=self._bump_history(),
            decode_header_values=self.decode_header_values,
        )
        message.thread_id = self._thread_for(message, joinable)
        self._messages[message.id] = message
        self._threads.setdefault(message.thread_id, []).append(message.id)
        self._record("messagesAdded", message)
        return message

    def _thread_for(self, message: MailboxMessage, joinable: Sequence[str] | None) -> str:
        """Gmail's rule: a reply joins the thread of a message it references in In-Reply-To or
        References only if the subjects match once reply prefixes are dropped. A sent message
        may join only the thread its request named; a received one may join any."""
        refs = message.referenced_ids()
        if not refs:  # references nothing: a thread of its own (and no scan of every thread)
            return message.id
        wanted = normalised_subject(message.doc.subject)
        for thread_id in list(self._threads) if joinable is None else joinable:
            members = [self._messages[i] for i in self._threads.get(thread_id, [])]
            if len(members) >= _MAX_THREAD_LENGTH:
                continue
            for member in members:
                if bare_message_id(member.doc.message_id) in refs and (
                    normalised_subject(member.doc.subject) == wanted
                ):
                    return thread_id
        return message.id

    def _remove(self, message: MailboxMessage) -> None:
        """Delete a message for good (a draft deleted or sent); its thread goes when empty."""
        del self._messages[message.id]
        members = self._threads[message.thread_id]
        members.remove(message.id)
        if not members:
            del self._threads[message.thread_id]
        message.history_id = self._bump_history()
        self._record("messagesDeleted", message)

    def _record(self, kind: str, message: MailboxMessage, changed: Iterable[str] = ()) -> None:
        record = _HistoryRecord(message.history_id, kind, message.with_labels(), tuple(changed))
        self._history.append(record)

    def _modify(self, message: MailboxMessage, add: Iterable[str], remove: Iterable[str]) -> None:
        added = [i for i in dict.fromkeys(add) if i not in message.label_ids]
        removed = [i for i in dict.fromkeys(remove) if i in message.label_ids and i not in added]
        if not added and not removed:
            return
        message.label_ids |= set(added)
        message.label_ids -= set(removed)
        message.history_id = self._bump_history()
        if added:
            self._record("labelsAdded", message, added)
        if removed:
            self._record("labelsRemoved", message, removed)

    def _check_labels(self, body: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        add, remove = list(body.get("addLabelIds", [])), list(body.get("removeLabelIds", []))
        if not add and not remove:
            raise api.bad_request("No label add or removes specified")
        for label in (*add, *remove):
            if label not in self._labels or label in _FIXED_LABELS:
                raise api.bad_request(f"Invalid label: {label}")
        return add, remove

    def _get_message(self, message_id: str) -> MailboxMessage:
        if not _ID.fullmatch(message_id):
            raise api.bad_request("Invalid id value")
        found = self._messages.get(message_id.lower())
        if found is None:
            raise api.not_found()
        return found

    # -- searching -------------------------------------------------------------------------------

    def _resolve_label(self, name: str) -> frozenset[str]:
        word = name.casefold()
        if word in _LABEL_WORDS:
            return frozenset({_LABEL_WORDS[word]})
        key = gmail_query.label_search_key(name)
        return frozenset(
            label.id
            for label in self._labels.values()
            if gmail_query.label_search_key(label.name) == key
        )

    def _search(self, params: Mapping[str, Any]) -> list[MailboxMessage]:
        """Messages matching ``q``, ``labelIds`` and ``includeSpamTrash``, newest first."""
        query = gmail_query.parse(params.get("q", ""))
        ctx = gmail_query.SearchContext(int(self._clock() * 1000), self._resolve_label)
        wanted = set(params.get("labelIds", []))
        hidden = (
            set()
            if params.get("includeSpamTrash") or gmail_query.mentions_anywhere(query)
            else {"SPAM", "TRASH"} - wanted - gmail_query.mentioned_labels(query, ctx)
        )
        found = [
            m
            for m in self._messages.values()
            if wanted <= m.label_ids
            and not (hidden & m.label_ids)
            and gmail_query.matches(
                query,
                m.search_view(),
                ctx,
            )
        ]
        return sorted(found, key=_newest_first)

    # -- handlers: one per discovery method, named in _HANDLERS -----------------------------------

    def _get_profile(self, call: _Call) -> Response:
        return _ok(
            {
                "emailAddress": self.address,
                "messagesTotal": len(self._messages),
                "threadsTotal": len(self._threads),
                "historyId": str(self._history_id),
            }
        )

    def _send_as_list(self, call: _Call) -> Response:
        primary = {"sendAsEmail": self.address, "displayName": "", "replyToAddress": "",
                   "signature": "", "isPrimary": True, "isDefault": True}
        aliases = [{"sendAsEmail": alias, "displayName": "", "replyToAddress": "",
                    "signature": "", "isDefault": False, "treatAsAlias": True,
                    "verificationStatus": "accepted"} for alias in self.send_as_aliases]
        return _ok({"sendAs": [primary, *aliases]})

    def _labels_list(self, call: _Call) -> Response:
        return _ok({"labels": [label.resource() for label in self._labels.values()]})

    def _labels_get(self, call: _Call) -> Response:
        label = self._labels.get(call.path["id"])
        if label is None:
            raise api.not_found()
        carrying = [m for m in self._messages.values() if label.id in m.label_ids]
        unread = [m for m in carrying if "UNREAD" in m.label_ids]
        return _ok(
            label.resource()
            | {
                "messagesTotal": len(carrying),
                "messagesUnread": len(unread),
                "threadsTotal": len({m.thread_id for m in carrying}),
                "threadsUnread": len({m.thread_id for m in unread}),
            }
        )

    def _labels_create(self, call: _Call) -> Response:
        return _ok(self._create_label(str(call.body.get("name", ""))).resource())

    def _messages_list(self, call: _Call) -> Response:
        found = self._search(call.params)
        page, token = api.page(found, [_newest_first(m) for m in found], call.params)
        return _ok(api.listing("messages", [m.ref() for m in page], token, len(found)))

    def _messages_get(self, call: _Call) -> Response:
        message = self._get_message(call.path["id"])
        fmt = call.params.get("format", "full")
        return _ok(message.resource(fmt, call.params.get("metadataHeaders", [])))

    def _messages_send(self, call: _Call) -> Response:
        if not call.body.get("raw"):
            upload = "uploading message via /upload/* URL"
            raise api.bad_request(f"'raw' RFC822 payload message string or {upload} required")
        raw = _decode_raw(call.body["raw"])
        return _ok(self._send(raw, call.body.get("threadId")).with_labels())

    def _send(self, raw: bytes, thread_hint: object) -> MailboxMessage:
        """Send ``raw`` (messages.send, drafts.send); it may join only the thread hinted at."""
        parsed = parse(raw)
        recipients = getaddresses(
            [str(v) for k in ("to", "cc", "bcc") for v in parsed.get_all(k, [])]
        )
        if not any(addr for _, addr in recipients):
            raise api.bad_request("Recipient address required")
        joinable = self._joinable(thread_hint)
        labels = {"SENT"}
        if any(addr.casefold() == self.address.casefold() for _, addr in recipients):
            labels |= {"INBOX", "UNREAD"}  # mail to oneself lands in one's own inbox too
        return self._store(self._completed(raw, parsed), labels, None, joinable)

    def _completed(self, raw: bytes, parsed: EmailMessage) -> bytes:
        """``raw`` with what Gmail fills in when the sender left it out; the rest byte for byte."""
        added = (
            b""
            if parsed["message-id"]
            else f"Message-ID: {make_msgid(domain='mail.gmail.com')}\r\n".encode()
        )
        added += b"" if parsed["from"] else f"From: {self.address}\r\n".encode()
        return added + raw

    def _joinable(self, thread_hint: object) -> list[str]:
        """The threads a new message may join: the one a request named, else none (Gmail
        threads what the API sends or drafts only into a thread the request names)."""
        if not thread_hint:
            return []
        if not _ID.fullmatch(str(thread_hint)):
            raise api.bad_request("Invalid thread_id value")
        if str(thread_hint) not in self._threads:
            raise api.not_found()
        return [str(thread_hint)]

    def _messages_modify(self, call: _Call) -> Response:
        message = self._get_message(call.path["id"])
        add, remove = self._check_labels(call.body)
        self._modify(message, add, remove)
        return _ok(message.with_labels())

    def _messages_batch_modify(self, call: _Call) -> Response:
        ids = list(call.body.get("ids", []))
        if not ids or len(ids) > 1000:
            raise api.bad_request("ids must hold between 1 and 1000 message ids")
        add, remove = self._check_labels(call.body)
        for message_id in ids:
            if not _ID.fullmatch(message_id):
                raise api.bad_request("Invalid id value")
        for message_id in ids:
            if message_id in self._messages:
                self._modify(self._messages[message_id], add, remove)
        return Response(204)

    # Drafts: a draft is a container with a stable id around one DRAFT-labelled message, which
    # lives in its thread (threads.get and searches show it, ``in:drafts`` finds it) but is not
    # sent. Sending it replaces it with a new message (a new id) labelled SENT.

    def _drafts_create(self, call: _Call) -> Response:
        message = call.body.get("message")
        if not isinstance(message, dict) or not message.get("raw"):
            raise api.bad_request("Missing draft message")
        raw = _decode_raw(message["raw"])
        joinable = self._joinable(message.get("threadId"))
        stored = self._store(self._completed(raw, parse(raw)), {"DRAFT"}, None, joinable)
        draft_id = f"r{secrets.randbits(64) - 2**63}"  # Gmail's look: r-8267489307414391806
        self._drafts[draft_id] = stored.id
        return _ok({"id": draft_id, "message": stored.with_labels()})

    def _drafts_get(self, call: _Call) -> Response:
        draft_id, message = self._get_draft(call.path["id"])
        fmt = call.params.get("format", "full")
        return _ok({"id": draft_id, "message": message.resource(fmt)})

    def _drafts_list(self, call: _Call) -> Response:
        found = self._search({**call.params, "labelIds": ["DRAFT"]})
        by_message = {message_id: draft_id for draft_id, message_id in self._drafts.items()}
        found = [m for m in found if m.id in by_message]
        page, token = api.page(found, [_newest_first(m) for m in found], call.params)
        drafts = [{"id": by_message[m.id], "message": m.ref()} for m in page]
        return _ok(api.listing("drafts", drafts, token, len(found)))

    def _drafts_delete(self, call: _Call) -> Response:
        draft_id, message = self._get_draft(call.path["id"])
        del self._drafts[draft_id]
        self._remove(message)
        return Response(204)

    def _drafts_send(self, call: _Call) -> Response:
        draft_id, held = self._get_draft(str(call.body.get("id") or ""))
        replacement = call.body.get("message")
        raw = held.raw
        if isinstance(replacement, dict) and replacement.get("raw"):
            raw = _decode_raw(replacement["raw"])
        sent = self._send(raw, held.thread_id)  # refused (no recipient): the draft stays
        del self._drafts[draft_id]
        self._remove(held)
        return _ok(sent.with_labels())

    def _get_draft(self, draft_id: str) -> tuple[str, MailboxMessage]:
        if not draft_id:
            raise api.bad_request("Missing draft id")
        message_id = self._drafts.get(draft_id)
        if message_id is None:
            raise api.not_found()
        return draft_id, self._messages[message_id]

    def _thread_members(self, thread_id: str) -> list[MailboxMessage]:
        if not _ID.fullmatch(thread_id):
            raise api.bad_request("Invalid id value")
        ids = self._threads.get(thread_id.lower())
        if ids is None:
            raise api.not_found()
        return sorted((self._messages[i] for i in ids), key=lambda m: (m.internal_date_ms, m.id))

    def _threads_get(self, call: _Call) -> Response:
        members = self._thread_members(call.path["id"])
        fmt, wanted = call.params.get("format", "full"), call.params.get("metadataHeaders", [])
        return _ok(
            {
                "id": members[0].thread_id,
                "historyId": str(max(m.history_id for m in members)),
                "messages": [m.resource(fmt, wanted) for m in members],
            }
        )

    def _threads_modify(self, call: _Call) -> Response:
        members = self._thread_members(call.path["id"])
        add, remove = self._check_labels(call.body)
        for message in members:
            self._modify(message, add, remove)
        return _ok(
            {
                "id": members[0].thread_id,
                "historyId": str(max(m.history_id for m in members)),
                "messages": [m.with_labels() for m in members],
            }
        )

    def _threads_list(self, call: _Call) -> Response:
        newest: dict[str, api.Key] = {}
        for message in self._search(call.params):
            newest.setdefault(message.thread_id, _newest_first(message))
        page, token = api.page(list(newest), list(newest.values()), call.params)
        threads = []
        for thread_id in page:
            members = self._thread_members(thread_id)
            threads.append(
                {
                    "id": thread_id,
                    "snippet": members[-1].snippet,
                    "historyId": str(max(m.history_id for m in members)),
                }
            )
        return _ok(api.listing("threads", threads, token, len(newest)))

    def _history_list(self, call: _Call) -> Response:
        start = call.params.get("startHistoryId")
        if start is None:
            raise api.bad_request("Missing/invalid parameter: startHistoryId")
        if int(start) < self._history_floor:
            raise api.not_found()
        kinds = {_HISTORY_KINDS[k] for k in call.params.get("historyTypes", [])}
        label = call.params.get("labelId")
        records = [
            r
            for r in self._history
            if r.id > int(start)
            and (not kinds or r.kind in kinds)
            and (label is None or label in r.message["labelIds"] or label in r.changed)
        ]
        page, token = api.page(records, [(r.id,) for r in records], call.params)
        history = []
        for record in page:
            detail: dict[str, Any] = {"message": record.message}
            if record.changed:
                detail["labelIds"] = list(record.changed)
            ref = {"id": record.message["id"], "threadId": record.message["threadId"]}
            history.append({"id": str(record.id), "messages": [ref], record.kind: [detail]})
        result: dict[str, Any] = {"history": history} if history else {}
        if token:
            result["nextPageToken"] = token
        return _ok(result | {"historyId": str(self._history_id)})


_HISTORY_KINDS = {
    "messageAdded": "messagesAdded",
    "messageDeleted": "messagesDeleted",
    "labelAdded": "labelsAdded",
    "labelRemoved": "labelsRemoved",
}

_HANDLERS: Mapping[str, Callable[[GmailEmulator, _Call], Response]] = {
    "getProfile": GmailEmulator._get_profile,
    "labels.list": GmailEmulator._labels_list,
    "labels.get": GmailEmulator._labels_get,
    "labels.create": GmailEmulator._labels_create,
    "messages.list": GmailEmulator._messages_list,
    "messages.get": GmailEmulator._messages_get,
    "messages.send": GmailEmulator._messages_send,
    "drafts.create": GmailEmulator._drafts_create,
    "drafts.get": GmailEmulator._drafts_get,
    "drafts.list": GmailEmulator._drafts_list,
    "drafts.delete": GmailEmulator._drafts_delete,
    "drafts.send": GmailEmulator._drafts_send,
    "messages.modify": GmailEmulator._messages_modify,
    "messages.batchModify": GmailEmulator._messages_batch_modify,
    "threads.get": GmailEmulator._threads_get,
    "threads.modify": GmailEmulator._threads_modify,
    "threads.list": GmailEmulator._threads_list,
    "history.list": GmailEmulator._history_list,
    "settings.sendAs.list": GmailEmulator._send_as_list,
}
