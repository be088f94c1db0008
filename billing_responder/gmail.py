"""The Gmail side: an adapter over google-api-python-client (the only module that imports it).

:class:`GmailMailbox` offers the pipeline exactly the operations it needs, in its own values
(:class:`~billing_responder.model.MessageRef`, :class:`~billing_responder.model.IncomingMessage`),
and turns the client's errors into the project's error tree:

- 401, a refused refresh token → :class:`GmailAuthError` (fatal: a person must re-authorise);
- a refresh the token endpoint fails without refusing the credential (429, 5xx, an error page)
  → an outage like any other, below: google-auth raises the same ``RefreshError`` for both, and
  only the first must stop the service (see :func:`refresh_refused`);
- 429, 5xx, 403 rate limits, timeouts and connection errors → retried here (see ``retry.py``),
  then :class:`TransientServiceError` (the message is left for the next cycle) — except
  ``messages.send`` and ``drafts.create``, which are never repeated blindly: a send (or draft)
  whose answer was lost may have worked, so the next cycle looks for the reply before trying
  again;
- anything else about one message (a 404 for a message deleted meanwhile, a 400) →
  :class:`TransientServiceError` as well, so nothing is marked handled that was not (a 404 on
  messages.get is its subclass :class:`MessageGoneError`, so a caller may tell "gone" apart);
- a 404 on users.history.list → :class:`HistoryExpiredError`: the start id is too old.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import google.auth.credentials
import google.auth.transport.requests
import google_auth_httplib2
import httplib2
import requests
from google.auth.exceptions import GoogleAuthError, RefreshError, TransportError
from google.auth.transport.requests import AuthorizedSession
from google.oauth2 import service_account
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from billing_responder.config import GmailConfig
from billing_responder.errors import (
    BillingResponderError,
    GmailAuthError,
    HistoryExpiredError,
    MessageGoneError,
    ServiceUnavailableError,
    TransientServiceError,
)
from billing_responder.governor import TokenBucket, Unlimited
from billing_responder.model import IncomingMessage, MailboxChange, MessageRef
from billing_responder.retry import RetryPolicy, parse_retry_after

log = logging.getLogger(__name__)

#: Read messages, send replies, apply labels: `gmail.modify` covers all three and nothing more
#: (no permanent deletion, no settings). See README "Gmail credentials" for the reasoning.
SCOPES = ("https://www.googleapis.com/auth/gmail.modify",)

#: 500 is the most messages.list returns in one page; fewer pages means fewer 5-unit calls.
_PAGE_SIZE = 500
_RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
#: What can make a message a candidate again: arriving, and gaining or losing a label (UNREAD or
#: INBOX back, SPAM/TRASH or our own label taken away). Deletions need no record: a deleted
#: message is no candidate, and its last label record is answered 404 on fetch.
_HISTORY_TYPES = ("messageAdded", "labelAdded", "labelRemoved")
_HISTORY_KINDS = ("messagesAdded", "labelsAdded", "labelsRemoved")
#: Quota units per call of the methods we use, from Google's table ("Usage limits", per-method
#: quota usage), keyed by the client's method id. A method missing here counts as 5, what most
#: methods cost, rather than as free.
QUOTA_UNITS: dict[str, int] = {
    "gmail.users.getProfile": 1,
    "gmail.users.settings.sendAs.list": 1,
    "gmail.users.labels.list": 1,
    "gmail.users.labels.create": 5,
    "gmail.users.history.list": 2,
    "gmail.users.messages.list": 5,
    "gmail.users.messages.get": 5,
    "gmail.users.messages.modify": 5,
    "gmail.users.messages.send": 100,
    "gmail.users.threads.get": 10,
    "gmail.users.drafts.create": 10,
}
_UNLISTED_UNITS = 5
#: How long every worker pauses after a 429 that came without a Retry-After.
_DEFAULT_BACK_OFF = 2.0


#: An authorised user's token (``billing-responder auth``), or a Workspace service account acting
#: as the mailbox's user through domain-wide delegation.
GmailCredentials = Credentials | service_account.Credentials


def load_credentials(config: GmailConfig) -> GmailCredentials:
    """The credentials ``[gmail]`` names: the service account key file when one is set, else the
    authorised-user token file (the client refreshes the access token when needed)."""
    if config.service_account_file is not None:
        return _service_account_credentials(config, config.service_account_file)
    path = config.token_file
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GmailAuthError(
            f"no token file at {path}: create one for this mailbox (README: Gmail credentials)"
        ) from None
    except (OSError, ValueError) as exc:
        raise GmailAuthError(f"cannot read the token file {path}: {exc}") from None
    try:
        credentials: Credentials = Credentials.from_authorized_user_info(  # type: ignore[no-untyped-call]
            info, scopes=list(SCOPES)
        )
    except ValueError as exc:
        raise GmailAuthError(f"{path} is not an authorised-user token file: {exc}") from None
    if config.token_uri:
        # google-auth ignores a token_uri inside the file on purpose; an emulator or proxy must be
        # configured explicitly.
        credentials = credentials.with_token_uri(config.token_uri)
    return credentials


def refresh_now(credentials: google.auth.credentials.Credentials) -> frozenset[str] | None:
    """Refresh the access token now; the scopes Google says it granted (None: not reported).

    A refresh proves the refresh token still works, which a call made with a still-valid access
    token would not. Nothing is written: the caller decides whether to keep the new token.
    """
    session = requests.Session()
    try:
        credentials.refresh(google.auth.transport.requests.Request(session))  # type: ignore[no-untyped-call]
    except RefreshError as exc:
        raise _refresh_failure(exc, fatal=True) from None
    except TransportError as exc:
        raise ServiceUnavailableError("Gmail", f"token endpoint unreachable ({exc})") from None
    finally:
        session.close()
    granted = getattr(credentials, "granted_scopes", None)
    return frozenset(granted) if granted else None


def _service_account_credentials(config: GmailConfig, path: Path) -> service_account.Credentials:
    try:
        credentials: service_account.Credentials = (
            service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                str(path), scopes=list(SCOPES), subject=config.delegated_user
            )
        )
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise GmailAuthError(
            f"no service account key file at {path} (README: Gmail credentials)"
        ) from None
    except OSError as exc:
        raise GmailAuthError(
            f"cannot read the service account key file {path}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:  # not JSON, missing fields, a private key that does not parse
        raise GmailAuthError(f"{path} is not a service account key file: {exc}") from None
    if mode & 0o077:
        log.warning(
            "the service account key file %s is open to other users (mode %04o); make it "
            "readable by its owner only: chmod 600 %s",
            path, mode, path,
        )
    if config.token_uri:
        # Whatever token_uri the key file holds, as for token files: an emulator or proxy is
        # named in the config.
        credentials = credentials.with_token_uri(config.token_uri)
    return credentials


def save_credentials(credentials: Credentials, path: Path) -> None:
    """Write the token file atomically, readable by its owner only, and owned by whoever owned
    the file it replaces (see :func:`_keep_owner`)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        _keep_owner(fd, path)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(credentials.to_json())  # type: ignore[no-untyped-call]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _keep_owner(fd: int, path: Path) -> None:
    """Give the new file ``fd`` the owner and group of the file at ``path`` it is to replace.

    An admin running ``once`` or ``test-reply`` as root refreshes the service's token too; a
    file written back as root's, mode 0600, is one the service user can no longer read, and its
    next start is "authorisation lost". Only root may give a file away: anyone else writes the
    file as their own, as before, and is told what the service will meet.
    """
    try:
        old = path.stat()
    except OSError:  # no file yet (`auth`), or none we may look at: nobody to keep
        return
    new = os.fstat(fd)
    if (old.st_uid, old.st_gid) == (new.st_uid, new.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        log.warning(
            "the token file %s belonged to uid %d, gid %d and is written back as uid %d, gid %d "
            "(only root can keep its owner); if the service runs as that user, give it back: "
            "chown %d:%d %s",
            path, old.st_uid, old.st_gid, new.st_uid, new.st_gid, old.st_uid, old.st_gid, path,
        )


class GmailMailbox:
    """The mailbox, through the real Gmail API client."""

    def __init__(
        self,
        config: GmailConfig,
        credentials: GmailCredentials,
        *,
        on_quota: Callable[[int], None] = lambda units: None,
        governor: TokenBucket | Unlimited | None = None,
    ) -> None:
        self._config = config
        #: Told the quota units of every request made, each attempt counted (for metrics).
        self._on_quota = on_quota
        #: Paces every request to the mailbox's quota, across all workers (see governor.py).
        self._governor = governor or Unlimited()
        self._credentials = credentials
        self._saved_token = credentials.token
        # httplib2 re-sends a request, POSTs included, when its connection closes without an
        # answer ("stale connection"), whatever RETRIES says. Reads may be repeated; a send must
        # not: the client library still builds the send request, but it goes out over requests
        # (google-auth's AuthorizedSession), which never re-sends a POST by itself.
        httplib2.RETRIES = 1
        # httplib2 is not thread-safe: each worker thread gets its own connections (Google's
        # advice for the client: one Http per thread, passed to execute()). The service object
        # only builds requests, so one is shared: parsing the API description once per worker
        # would cost megabytes each.
        self._local = threading.local()
        self._connections: list[tuple[Any, Any]] = []
        self._connections_lock = threading.Lock()
        client_options = {"api_endpoint": config.api_endpoint} if config.api_endpoint else None
        self._service: Any = build(
            "gmail",
            "v1",
            http=self._http(),
            client_options=client_options,
            static_discovery=True,
            cache_discovery=False,
        )
        # The client makes a resource's methods anew each time one is asked for (about 3 ms of
        # CPU for users().messages()): the two used per message are made once. Resources only
        # build requests, so the workers share them.
        self._users: Any = self._service.users()
        self._messages: Any = self._users.messages()
        self._user = config.user_id
        self._label_ids: dict[str, str] = {}

    # -- mailbox-wide -----------------------------------------------------------------------------

    def address(self) -> str:
        """The mailbox's own email address (users.getProfile)."""
        profile = self._call(self._users.getProfile(userId=self._user), fatal=True)
        return str(profile["emailAddress"])

    def send_as_addresses(self) -> list[str]:
        """Every address the mailbox sends as (its own and its "Send mail as" aliases)."""
        request = self._users.settings().sendAs().list(userId=self._user)
        found = self._call(request, fatal=True)
        return [str(item["sendAsEmail"]) for item in found.get("sendAs", [])]

    def label_ids(self, names: Sequence[str], *, create: bool) -> dict[str, str | None]:
        """Each label name's id; missing labels are created when ``create`` (else None)."""
        existing = self._call(self._users.labels().list(userId=self._user), fatal=True)
        by_name = {label["name"]: label["id"] for label in existing.get("labels", [])}
        result: dict[str, str | None] = {}
        for name in names:
            if name not in by_name and create:
                body = {
                    "name": name,
                    "labelListVisibility": "labelShow",
                    "messageListVisibility": "show",
                }
                created = self._call(
                    self._users.labels().create(userId=self._user, body=body),
                    fatal=True,
                )
                by_name[name] = created["id"]
                log.info("created Gmail label %r", name)
            result[name] = by_name.get(name)
        self._label_ids.update({k: v for k, v in result.items() if v is not None})
        return result

    def candidate_pages(self, query: str) -> Iterator[list[MessageRef]]:
        """Every message matching ``query``, newest first, one page (500) at a time; the next
        page is asked for only when the caller wants it."""
        token: str | None = None
        while True:
            request = self._messages.list(
                userId=self._user, q=query, maxResults=_PAGE_SIZE, pageToken=token
            )
            page = self._call(request, fatal=True)
            yield [
                MessageRef(id=item["id"], thread_id=item["threadId"])
                for item in page.get("messages", [])
            ]
            token = page.get("nextPageToken")
            if not token:
                return

    def history_id(self) -> int:
        """The mailbox's current history id (users.getProfile, 1 quota unit)."""
        profile = self._call(self._users.getProfile(userId=self._user), fatal=True)
        return int(profile["historyId"])

    def changes_since(self, history_id: int) -> tuple[list[MailboxChange], int]:
        """Messages added or relabelled after ``history_id``, oldest change first, each once with
        its labels after its latest change; and the history id to start from next time.

        users.history.list, 2 quota units a page. The id to continue from is the one Gmail
        reported on the first page: anything newer is either in this listing too (and seen again
        next time, harmlessly) or not yet, and then in the next window.
        """
        names = {label_id: name for name, label_id in self._label_ids.items()}
        changes: dict[str, MailboxChange] = {}
        token: str | None = None
        next_id: int | None = None
        while True:
            request = self._users.history().list(
                userId=self._user,
                startHistoryId=str(history_id),
                historyTypes=list(_HISTORY_TYPES),
                maxResults=_PAGE_SIZE,
                pageToken=token,
            )
            page = self._call(
                request, fatal=True, not_found=lambda: HistoryExpiredError(history_id)
            )
            if next_id is None:
                next_id = int(page["historyId"])
            for record in page.get("history", []):
                for kind in _HISTORY_KINDS:
                    for item in record.get(kind, []):
                        change = _change(item["message"], names)
                        changes.pop(change.ref.id, None)  # keep each message at its latest place
                        changes[change.ref.id] = change
            token = page.get("nextPageToken")
            if not token:
                return list(changes.values()), next_id

    def close(self) -> None:
        """Close the HTTP connections, every worker's."""
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for client, session in connections:
            client.close()
            session.close()

    def _http(self) -> Any:
        """This thread's httplib2 connection, authorised (made on first use)."""
        return self._thread_connections()[0]

    def _send_session(self) -> AuthorizedSession:
        """This thread's requests session for the writes made once (made on first use)."""
        session: AuthorizedSession = self._thread_connections()[1]
        return session

    def _thread_connections(self) -> tuple[Any, Any]:
        connections: tuple[Any, Any] | None = getattr(self._local, "connections", None)
        if connections is None:
            http = google_auth_httplib2.AuthorizedHttp(
                self._credentials, http=httplib2.Http(timeout=self._config.timeout_seconds)
            )
            session = AuthorizedSession(self._credentials)  # type: ignore[no-untyped-call]
            connections = (http, session)
            self._local.connections = connections
            with self._connections_lock:
                self._connections.append(connections)
        return connections

    def persist_refreshed_token(self) -> None:
        """Write the token file back if the client refreshed the access token meanwhile.

        Not fatal when it fails: the refresh token in the file still works, the next start just
        refreshes once more. A service account has nothing to write: it signs a new assertion
        whenever it needs an access token.
        """
        if not isinstance(self._credentials, Credentials):
            return
        if self._credentials.token == self._saved_token:
            return
        try:
            save_credentials(self._credentials, self._config.token_file)
        except OSError as exc:
            log.warning("cannot write the refreshed token to %s: %s", self._config.token_file, exc)
            return
        self._saved_token = self._credentials.token

    # -- one message ------------------------------------------------------------------------------

    def fetch(self, ref: MessageRef) -> IncomingMessage:
        """Every header of a message, without its body (format=metadata)."""
        data = self._call(
            self._messages.get(userId=self._user, id=ref.id, format="metadata"),
            not_found=lambda: MessageGoneError(f"message {ref.id} no longer exists (404)"),
        )
        payload = data.get("payload", {})
        headers = tuple((h["name"], h["value"]) for h in payload.get("headers", []))
        return IncomingMessage(
            id=data["id"],
            thread_id=data["threadId"],
            label_ids=frozenset(data.get("labelIds", [])),
            headers=headers,
            internal_date_ms=int(data.get("internalDate", 0)),
        )

    def send(self, raw: bytes, thread_id: str | None) -> str:
        """Send a raw RFC 822 message in ``thread_id`` (None: a new conversation); returns the
        sent message's Gmail id."""
        body = {"raw": base64.urlsafe_b64encode(raw).decode("ascii")}
        if thread_id is not None:
            body["threadId"] = thread_id
        # Not a media upload: the client builds upload URLs with https even for an http endpoint.
        request = self._messages.send(userId=self._user, body=body)
        return str(self._post_once(request, "send")["id"])

    def create_draft(self, raw: bytes, thread_id: str) -> str:
        """Leave a raw RFC 822 message as a draft in ``thread_id``; returns the Gmail id of the
        draft's message. Never repeated blindly, like :meth:`send`: a draft whose answer was
        lost may have been made, and a second one would be a second reply for a person to send.
        """
        message = {"raw": base64.urlsafe_b64encode(raw).decode("ascii"), "threadId": thread_id}
        drafts = self._users.drafts()
        request = drafts.create(userId=self._user, body={"message": message})
        return str(self._post_once(request, "creating the draft")["message"]["id"])

    def find_sent_reply(self, thread_id: str, message_id: str) -> str | None:
        """The Gmail id of our reply with Message-ID ``message_id``, if it exists (sent, or a
        draft: Gmail shows drafts in their thread and in searches alike).

        The thread is read first (where a reply normally lands, and not subject to search
        indexing lag); a ``rfc822msgid:`` search covers a reply Gmail filed in another thread.
        """
        thread = self._call(
            self._users.threads().get(
                userId=self._user, id=thread_id, format="metadata", metadataHeaders=["Message-ID"]
            ),
            not_found=lambda: MessageGoneError(f"thread {thread_id} no longer exists (404)"),
        )
        for message in thread.get("messages", []):
            for header in message.get("payload", {}).get("headers", []):
                if header["name"].lower() == "message-id" and header["value"] == message_id:
                    return str(message["id"])
        query = f"rfc822msgid:{message_id.strip('<>')}"
        page = self._call(
            self._messages.list(
                userId=self._user, q=query, maxResults=1, includeSpamTrash=True
            )
        )
        found = page.get("messages", [])
        return str(found[0]["id"]) if found else None

    def modify(
        self, message_id: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> None:
        """Add and remove labels (by name or system id) on one message, in one call."""
        body = {
            "addLabelIds": [self._label_ids.get(name, name) for name in add],
            "removeLabelIds": [self._label_ids.get(name, name) for name in remove],
        }
        self._call(
            self._messages.modify(userId=self._user, id=message_id, body=body),
            not_found=lambda: MessageGoneError(f"message {message_id} no longer exists (404)"),
        )

    # -- error mapping ----------------------------------------------------------------------------

    def _post_once(self, request: Any, what: str) -> Any:
        """Make a write that must not be repeated blindly exactly once, over requests (see
        ``__init__``); its JSON answer. Every failure is transient except a refused credential:
        the next cycle looks for what may have been made before trying again."""
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        self._spend_quota(request)
        try:
            response = self._send_session().request(  # type: ignore[no-untyped-call]
                request.method,
                request.uri,
                data=request.body,
                headers=headers,
                timeout=self._config.timeout_seconds,
            )
        except RefreshError as exc:
            # Nothing was sent: a refresh comes before the request, or after a 401 for it.
            raise _refresh_failure(exc, fatal=False) from None
        except (requests.RequestException, TransportError) as exc:
            raise TransientServiceError(
                "Gmail", f"{what} failed, maybe after Gmail took it ({type(exc).__name__}: {exc})"
            ) from None
        if response.status_code == 401:
            raise GmailAuthError(f"Gmail rejected the credentials (401): {_json_error(response)}")
        status = response.status_code
        if status == 429 or (status == 403 and _json_reason(response) in _RATE_LIMIT_REASONS):
            told = parse_retry_after(response.headers.get("retry-after"))
            self._governor.back_off(_DEFAULT_BACK_OFF if told is None else told)
        if response.status_code >= 400:
            raise TransientServiceError(
                "Gmail", f"HTTP {response.status_code}: {_json_error(response)}"
            )
        return response.json()

    def _call(
        self,
        request: Any,
        *,
        fatal: bool = False,
        retry: bool = True,
        not_found: Callable[[], BillingResponderError] | None = None,
    ) -> Any:
        """Execute with the Gmail retry policy; map what is left to the project's errors.

        ``fatal`` marks mailbox-wide calls: if those still fail after retries, the cycle cannot
        run at all, so the failure is fatal rather than one message's. ``retry=False`` is for
        calls that must not be repeated blindly (a send). ``not_found`` makes the error a 404
        means for this call.
        """

        def execute() -> Any:
            self._spend_quota(request)
            try:
                return request.execute(http=self._http())
            except HttpError as exc:
                if is_rate_limited(exc):
                    told = retry_after_seconds(exc)
                    self._governor.back_off(_DEFAULT_BACK_OFF if told is None else told)
                raise

        try:
            return GMAIL_RETRY.call(execute) if retry else execute()
        except RefreshError as exc:
            raise _refresh_failure(exc, fatal=fatal) from None
        except HttpError as exc:
            status = exc.resp.status
            detail = _http_error_detail(exc)
            if status == 401:
                raise GmailAuthError(f"Gmail rejected the credentials (401): {detail}") from None
            if status == 404 and not_found is not None:
                raise not_found() from None
            if fatal:
                raise ServiceUnavailableError("Gmail", f"HTTP {status}: {detail}") from None
            raise TransientServiceError("Gmail", f"HTTP {status}: {detail}") from None
        except (OSError, http.client.HTTPException, httplib2.HttpLib2Error, TransportError) as exc:
            problem = f"unreachable ({type(exc).__name__}: {exc})"
            if fatal:
                raise ServiceUnavailableError("Gmail", problem) from None
            raise TransientServiceError("Gmail", problem) from None
        except GoogleAuthError as exc:
            raise GmailAuthError(str(exc)) from None

    def _spend_quota(self, request: Any) -> None:
        """Wait for the quota one attempt of ``request`` costs, and report it; every Gmail request
        goes through here first."""
        units = QUOTA_UNITS.get(request.methodId, _UNLISTED_UNITS)
        self._governor.take(units)
        self._on_quota(units)


def _change(message: dict[str, Any], label_names: dict[str, str]) -> MailboxChange:
    ref = MessageRef(id=message["id"], thread_id=message["threadId"])
    if "labelIds" not in message:
        return MailboxChange(ref, None)
    return MailboxChange(ref, frozenset(label_names.get(i, i) for i in message["labelIds"]))


def is_rate_limited(exc: HttpError) -> bool:
    """Whether Gmail said "too many requests": 429, or 403 with a rate-limit reason."""
    status = exc.resp.status
    return status == 429 or (status == 403 and _http_error_reason(exc) in _RATE_LIMIT_REASONS)


def is_retryable(exc: BaseException) -> bool:
    """Whether a Gmail call that raised ``exc`` is worth trying again."""
    if isinstance(exc, HttpError):
        return exc.resp.status >= 500 or is_rate_limited(exc)
    # Socket timeouts are OSErrors (TimeoutError) too; a connection dropped mid-answer surfaces
    # from httplib2 as http.client.HTTPException (IncompleteRead, RemoteDisconnected...).
    # A RefreshError is not retried here: google-auth has already tried the token endpoint three
    # times, with back-off, for any answer worth repeating.
    return isinstance(
        exc, OSError | http.client.HTTPException | httplib2.HttpLib2Error | TransportError
    )


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's ``Retry-After`` in seconds, when it sent one."""
    if isinstance(exc, HttpError):
        return parse_retry_after(exc.resp.get("retry-after"))
    return None


def _http_error_reason(exc: HttpError) -> str:
    try:
        body = json.loads(exc.content)
        return str(body["error"]["errors"][0]["reason"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def _http_error_detail(exc: HttpError) -> str:
    try:
        body = json.loads(exc.content)
        message = str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = exc.resp.reason or "no detail"
    reason = _http_error_reason(exc)
    return f"{message} ({reason})" if reason else message


def _json_reason(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["errors"][0]["reason"])
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


def _json_error(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        reason = error.get("errors", [{}])[0].get("reason", "")
        message = str(error["message"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return response.reason or "no detail"
    return f"{message} ({reason})" if reason else message


#: Token-endpoint error codes that refuse the credential itself: those of RFC 6749 section 5.2,
#: all about the request or the grant, and ``access_denied`` for an account or client an
#: administrator blocked. No wait mends them; a person must authorise again. A service account's
#: refused key (a deleted key, a clock far off) is ``invalid_grant`` too.
_REFUSALS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
    }
)
#: google-auth's own refusals, made without asking the endpoint: a token file lacking a field a
#: refresh needs, and a Workspace policy that wants the user to sign in again.
_LOCAL_REFUSALS = ("necessary fields", "Reauthentication is needed")
_HTML_TITLE = re.compile(r"<title>([^<]{1,120})</title>", re.IGNORECASE)


def refresh_refused(exc: RefreshError) -> bool:
    """Whether a failed refresh means the credential was refused (only a person can fix that),
    rather than that the token endpoint failed to answer (a later cycle may do better).

    google-auth raises ``RefreshError`` for both. It sets ``retryable`` on an answer it already
    tried three times (429, 5xx, ``temporarily_unavailable``), but not on every outage: a 5xx
    page that is not JSON is ``retryable=False`` for a user's token. So, short of the flag, it
    is a refusal only when the endpoint named one, or google-auth refused before asking.
    """
    if exc.retryable:
        return False
    code = _oauth_error_code(exc)
    if code is not None:
        return code in _REFUSALS
    message = _refresh_message(exc)
    return any(marker in message for marker in _LOCAL_REFUSALS)


def _refresh_failure(exc: RefreshError, *, fatal: bool) -> BillingResponderError:
    """The project's error for a failed refresh: lost authorisation when the credential was
    refused; else an outage, of the whole cycle when the call was ``fatal``, else of one
    message."""
    if refresh_refused(exc):
        return GmailAuthError(_refresh_problem(exc))
    problem = f"the token endpoint gave no access token ({_refresh_outage(exc)})"
    if fatal:
        return ServiceUnavailableError("Gmail", problem)
    return TransientServiceError("Gmail", problem)


def _oauth_error_code(exc: RefreshError) -> str | None:
    """The ``error`` code of the token endpoint's JSON answer, if it sent one (google-auth
    passes the parsed answer as the exception's second argument)."""
    answer = exc.args[1] if len(exc.args) > 1 else None
    code = answer.get("error") if isinstance(answer, dict) else None
    return code if isinstance(code, str) else None


def _refresh_message(exc: RefreshError) -> str:
    """google-auth's message alone, without the parsed answer ``str(exc)`` would add."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def _refresh_outage(exc: RefreshError) -> str:
    """A line saying how the token endpoint failed: its error, or the title of the HTML error
    page a front end sent instead (the whole page would bury the log line)."""
    if _oauth_error_code(exc) is not None:
        return _refresh_message(exc)
    text = " ".join(_refresh_message(exc).split())
    title = _HTML_TITLE.search(text)
    if title:
        return f"an error page: {title.group(1).strip()}"
    return text if len(text) <= 120 else text[:117] + "..."


def _refresh_problem(exc: RefreshError) -> str:
    text = str(exc)
    if "Invalid JWT" in text or "account not found" in text:
        # A service account's assertion refused: its key was deleted, or the clock is off.
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else text
        return (
            f"the service account key was refused ({detail}); create a new key, point "
            "[gmail] service_account_file at it, and check this computer's clock"
        )
    if "invalid_grant" in text:
        return (
            "the refresh token was refused (invalid_grant: expired or revoked); authorise the "
            "mailbox again and replace the token file (README: Gmail credentials)"
        )
    if "unauthorized_client" in text:
        return (
            "the service account may not act as the mailbox (unauthorized_client): in the Google "
            "Admin console, grant its client ID domain-wide delegation for the gmail.modify scope"
        )
    if "invalid_scope" in text:
        # Google refuses a refresh that asks for more than the user granted at consent.
        return (
            "the authorisation does not cover the scope gmail.modify (invalid_scope); authorise "
            "the mailbox again, granting it (README: Gmail credentials)"
        )
    return f"cannot refresh the access token: {_refresh_message(exc)}"


#: Gmail: 429, 5xx, 403 rate limits and network errors, with back-off and Retry-After.
GMAIL_RETRY = RetryPolicy("Gmail", retryable=is_retryable, retry_after=retry_after_seconds)
