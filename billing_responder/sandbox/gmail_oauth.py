"""Google's OAuth 2.0 endpoints, for the Gmail emulator: consent, code exchange, service accounts.

The Gmail emulator serves these beside the API, so `billing-responder auth` and a service-account
config run their real client libraries (google-auth-oauthlib, google-auth) end to end:

* ``GET /o/oauth2/auth`` (and ``/o/oauth2/v2/auth``): the authorization endpoint. It checks the
  request as Google does (a known client, a loopback ``redirect_uri`` as a Desktop-app client
  may use, ``response_type=code``, known scopes, a well-formed PKCE challenge); a request it
  cannot send back is answered with an error page, as Google shows one. Then the user -- the
  emulator's one mailbox -- decides at once: by default they consent and the browser is sent
  302 to ``redirect_uri`` with ``code``, ``state`` and ``scope``; :meth:`GoogleOAuth.set_consent`
  makes them refuse (``error=access_denied``) or untick scopes (Google's granular consent).
* ``POST /token`` with ``grant_type=authorization_code``: the code exchange. The client
  authenticates with HTTP Basic or form fields; the code is single-use, bound to its client and
  redirect URI, and to its PKCE challenge (``Missing code verifier.`` / ``Invalid code
  verifier.``). A refresh token comes with offline access on first consent or with
  ``prompt=consent`` -- on later consents Google sends none, which is why `auth` asks again.
* ``POST /token`` with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``: a service
  account's signed assertion (RS256, checked against the public half of a key this module made,
  found by ``kid``), with Google's claim checks (``iss``, ``aud``, a lifetime of at most an hour,
  ``scope``) and domain-wide delegation: ``sub`` must be the mailbox and the delegated scopes
  must cover the request, else ``401 unauthorized_client``.
* Every other grant goes on to the emulator's refresh-token handler.

Error bodies are those of Google's token endpoint: ``{"error": ..., "error_description": ...}``,
injected faults at ``/token`` included (:func:`token_fault_response`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from html import escape
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from billing_responder.sandbox._http import Fault, RecordedRequest, Response

if TYPE_CHECKING:
    from billing_responder.sandbox.gmail import GmailEmulator

AUTHORIZE_PATHS = ("/o/oauth2/auth", "/o/oauth2/v2/auth")
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: What google-auth puts in a service account's ``aud`` claim whatever its token URI.
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
GMAIL_MODIFY = "https://www.googleapis.com/auth/gmail.modify"

#: The emulator's one registered OAuth client (a "Desktop app" client).
SANDBOX_CLIENT_ID = "sandbox-client.apps.googleusercontent.com"
SANDBOX_CLIENT_SECRET = "sandbox-client-secret"  # noqa: S105 - a sandbox value, not a secret

#: Scopes the emulator knows; anything else is ``invalid_scope`` as at Google.
KNOWN_SCOPES = frozenset(
    {
        "https://mail.google.com/",
        GMAIL_MODIFY,
        "https://www.googleapis.com/auth/gmail.readonly",
        "https://www.googleapis.com/auth/gmail.send",
        "https://www.googleapis.com/auth/gmail.labels",
        "https://www.googleapis.com/auth/gmail.compose",
        "https://www.googleapis.com/auth/gmail.metadata",
        "https://www.googleapis.com/auth/userinfo.email",
        "openid",
        "email",
        "profile",
    }
)
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
_CODE_LIFETIME = 600
_ACCESS_TOKEN_LIFETIME = 3599
_MAX_ASSERTION_LIFETIME = 3600
_CLOCK_SKEW = 300
_UNAUTHORIZED_CLIENT = (
    "Client is unauthorized to retrieve access tokens using this method, or client not "
    "authorized for any of the scopes requested."
)
_BAD_LIFETIME = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)


@dataclass(frozen=True)
class Authorization:
    """One visit to the authorization endpoint that got as far as the user's decision."""

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    access_type: str
    prompt: str
    code_challenge_method: str  # "" without PKCE
    outcome: str  # "code" or "access_denied"


@dataclass
class Grant:
    """One token-endpoint request the emulator judged (refresh grants are not recorded here).

    Filled in as the request is read, so a refusal records as much as was known by then.
    """

    grant_type: str
    client: str = ""  # the OAuth client id, or a service account's client_email
    subject: str = ""  # whom the token would act for: the mailbox, or a JWT's sub
    scopes: tuple[str, ...] = ()
    error: str = ""  # the OAuth error code when refused


@dataclass(frozen=True)
class ServiceAccount:
    """A service-account key the emulator made; it keeps only the public half after writing."""

    client_email: str
    client_id: str
    key_id: str
    public_key: rsa.RSAPublicKey
    delegated_scopes: tuple[str, ...]


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    challenge: str
    method: str
    refresh: bool  # whether this exchange hands out a refresh token
    expires: float


@dataclass
class _Consent:
    allow: bool = True
    scopes: tuple[str, ...] | None = None  # None: everything requested


class OAuthRefusalError(Exception):
    """A token-endpoint error, as Google's endpoint words it."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status

    def response(self) -> Response:
        return Response.json(
            self.status, {"error": self.error, "error_description": self.description}
        )


class GoogleOAuth:
    """The OAuth side of one :class:`~billing_responder.sandbox.gmail.GmailEmulator`."""

    def __init__(self, emulator: GmailEmulator) -> None:
        self.emulator = emulator
        #: Registered OAuth clients, client id -> client secret.
        self.clients = {SANDBOX_CLIENT_ID: SANDBOX_CLIENT_SECRET}
        self._lock = threading.Lock()
        self._consent = _Consent()
        self._codes: dict[str, _Code] = {}
        self._consented: set[str] = set()  # clients the user has approved before
        self._accounts: dict[str, ServiceAccount] = {}  # by key id
        self._authorizations: list[Authorization] = []
        self._grants: list[Grant] = []

    # -- knobs and inspection -------------------------------------------------------------------

    def set_consent(self, *, allow: bool = True, scopes: Sequence[str] | None = None) -> None:
        """How the user answers the consent screen: refuse, or grant only ``scopes``."""
        with self._lock:
            self._consent = _Consent(allow, None if scopes is None else tuple(scopes))

    def authorizations(self) -> list[Authorization]:
        """Every consent screen shown, oldest first."""
        with self._lock:
            return list(self._authorizations)

    def grants(self) -> list[Grant]:
        """Every authorization-code and JWT-bearer token request, oldest first."""
        with self._lock:
            return [replace(g) for g in self._grants]

    def write_client_secrets(self, path: Path) -> Path:
        """A Desktop-app ``client_secret.json`` whose endpoints are this emulator's."""
        info = {
            "installed": {
                "client_id": SANDBOX_CLIENT_ID,
                "project_id": "billing-responder-sandbox",
                "auth_uri": f"{self.emulator.url}{AUTHORIZE_PATHS[0]}",
                "token_uri": f"{self.emulator.url}/token",
                "auth_provider_x509_cert_url": f"{self.emulator.url}/oauth2/v1/certs",
                "client_secret": SANDBOX_CLIENT_SECRET,
                "redirect_uris": ["http://localhost"],
            }
        }
        path.write_text(json.dumps(info, indent=2), encoding="utf-8")
        return path

    def write_service_account_file(
        self,
        path: Path,
        *,
        name: str = "billing-responder",
        delegated_scopes: Sequence[str] = (GMAIL_MODIFY,),
    ) -> ServiceAccount:
        """A new service-account key file, as the Cloud console downloads one (mode 0600).

        ``delegated_scopes`` is what a Workspace admin granted the account's client id under
        domain-wide delegation; ``()`` is an account nobody delegated to.
        """
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        account = ServiceAccount(
            client_email=f"{name}@billing-responder-sandbox.iam.gserviceaccount.com",
            client_id=str(10**20 + secrets.randbelow(10**20)),
            key_id=key_id,
            public_key=private.public_key(),
            delegated_scopes=tuple(delegated_scopes),
        )
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        info = {
            "type": "service_account",
            "project_id": "billing-responder-sandbox",
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": account.client_email,
            "client_id": account.client_id,
            "auth_uri": f"{self.emulator.url}{AUTHORIZE_PATHS[0]}",
            "token_uri": f"{self.emulator.url}/token",
            "auth_provider_x509_cert_url": f"{self.emulator.url}/oauth2/v1/certs",
            "client_x509_cert_url": f"{self.emulator.url}/robot/v1/metadata/x509/{name}",
            "universe_domain": "googleapis.com",
        }
        path.write_text(json.dumps(info, indent=2), encoding="utf-8")
        path.chmod(0o600)
        with self._lock:
            self._accounts[key_id] = account
        return account

    # -- the authorization endpoint -------------------------------------------------------------

    def authorize(self, request: RecordedRequest) -> Response:
        """The consent screen: an error page, or a 302 back to the app with a code or a refusal."""
        params = {k: v[0] for k, v in request.query.items()}
        client_id = params.get("client_id", "")
        if not client_id:
            return _error_page(400, "invalid_request", "Missing required parameter: client_id")
        if client_id not in self.clients:
            return _error_page(401, "invalid_client", "The OAuth client was not found.")
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri:
            return _error_page(400, "invalid_request", "Missing required parameter: redirect_uri")
        if not _is_loopback(redirect_uri):
            # A Desktop-app client may only come back to a loopback address (any port).
            return _error_page(
                400,
                "redirect_uri_mismatch",
                f"You can't sign in to this app because it doesn't comply with Google's OAuth "
                f"2.0 policy. redirect_uri={redirect_uri}",
            )
        problem = _authorize_problem(params)
        if problem is not None:
            return _error_page(400, *problem)
        scopes = tuple(dict.fromkeys(params["scope"].split()))
        prompt = params.get("prompt", "")
        access_type = params.get("access_type", "online")
        method = params.get("code_challenge_method", "plain" if "code_challenge" in params else "")
        with self._lock:
            consent = self._consent
            outcome = "code" if consent.allow else "access_denied"
            self._authorizations.append(
                Authorization(client_id, redirect_uri, scopes, access_type, prompt, method, outcome)
            )
            answer: dict[str, str] = {}
            if not consent.allow:
                answer["error"] = "access_denied"
            else:
                granted = (
                    scopes
                    if consent.scopes is None
                    else tuple(s for s in scopes if s in consent.scopes)
                )
                code = f"4/0sandbox-{secrets.token_urlsafe(32)}"
                first = client_id not in self._consented
                self._consented.add(client_id)
                self._codes[code] = _Code(
                    client_id=client_id,
                    redirect_uri=redirect_uri,
                    scopes=granted,
                    challenge=params.get("code_challenge", ""),
                    method=method,
                    refresh=access_type == "offline" and (first or "consent" in prompt.split()),
                    expires=time.time() + _CODE_LIFETIME,
                )
                answer |= {"code": code, "scope": " ".join(granted)}
        if "state" in params:
            answer = {"state": params["state"], **answer}
        separator = "&" if urllib.parse.urlsplit(redirect_uri).query else "?"
        location = redirect_uri + separator + urllib.parse.urlencode(answer)
        return Response(302, b"", {"Location": location, "Content-Type": "text/html"})

    # -- the token endpoint ---------------------------------------------------------------------

    def token(
        self, request: RecordedRequest, *, refresh: Callable[[RecordedRequest], Response]
    ) -> Response:
        """``POST /token``: the code and JWT-bearer grants here, anything else to ``refresh``."""
        form = {k: v[0] for k, v in request.form().items()} if request.method == "POST" else {}
        grant = Grant(form.get("grant_type", ""))
        if grant.grant_type == "authorization_code":
            handler = self._exchange_code
        elif grant.grant_type == JWT_BEARER:
            handler = self._jwt_grant
        else:
            return refresh(request)
        try:
            response = handler(request, form, grant)
        except OAuthRefusalError as refusal:
            grant.error = refusal.error
            response = refusal.response()
        with self._lock:
            self._grants.append(grant)
        return response

    def _exchange_code(
        self, request: RecordedRequest, form: dict[str, str], grant: Grant
    ) -> Response:
        grant.client = client_id = self._authenticate_client(request, form)
        code = form.get("code", "")
        if not code:
            raise OAuthRefusalError("invalid_request", "Missing required parameter: code")
        with self._lock:
            issued = self._codes.pop(code, None)  # single use, whatever happens next
        if issued is None or issued.client_id != client_id or issued.expires < time.time():
            raise OAuthRefusalError("invalid_grant", "Bad Request")
        grant.subject, grant.scopes = self.emulator.address, issued.scopes
        if form.get("redirect_uri", "") != issued.redirect_uri:
            raise OAuthRefusalError("redirect_uri_mismatch", "Bad Request")
        if issued.challenge:
            verifier = form.get("code_verifier", "")
            if not verifier:
                raise OAuthRefusalError("invalid_grant", "Missing code verifier.")
            if _challenge(verifier, issued.method) != issued.challenge:
                raise OAuthRefusalError("invalid_grant", "Invalid code verifier.")
        emulator = self.emulator
        answer: dict[str, Any] = {
            "access_token": emulator.issue_access_token(),
            "expires_in": _ACCESS_TOKEN_LIFETIME,
            "scope": " ".join(issued.scopes),
            "token_type": "Bearer",
        }
        if issued.refresh:
            # The emulator has one user and one grant: a fresh consent makes that grant good
            # again after GmailEmulator.revoke(), as a new refresh token would at Google, and
            # what it covers is what the user granted this time.
            with emulator._lock:
                emulator._revoked = False
                emulator.granted_scope = " ".join(issued.scopes)
            answer["refresh_token"] = emulator.refresh_token
        return Response.json(200, answer, {"Cache-Control": "no-cache, no-store, max-age=0"})

    def _authenticate_client(self, request: RecordedRequest, form: dict[str, str]) -> str:
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthRefusalError("invalid_request", "Bad Request") from None
            user, _, password = decoded.partition(":")
            client_id = urllib.parse.unquote_plus(user)
            secret = urllib.parse.unquote_plus(password)
        if not client_id:
            raise OAuthRefusalError(
                "invalid_request", "Could not determine client ID from request."
            )
        if client_id not in self.clients:
            raise OAuthRefusalError("invalid_client", "The OAuth client was not found.", 401)
        if secret != self.clients[client_id]:
            raise OAuthRefusalError("invalid_client", "Unauthorized", 401)
        return client_id

    def _jwt_grant(self, request: RecordedRequest, form: dict[str, str], grant: Grant) -> Response:
        assertion = form.get("assertion", "")
        if not assertion:
            raise OAuthRefusalError("invalid_request", "Missing required parameter: assertion")
        header, claims, signed, signature = _split_jwt(assertion)
        grant.client = issuer = str(claims.get("iss", ""))
        with self._lock:
            account = self._accounts.get(str(header.get("kid", "")))
        if account is None or account.client_email != issuer or header.get("alg") != "RS256":
            raise OAuthRefusalError("invalid_grant", "Invalid JWT Signature.")
        try:
            account.public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise OAuthRefusalError("invalid_grant", "Invalid JWT Signature.") from None
        audience = claims.get("aud")
        # google-auth puts Google's endpoint in aud; older versions put their token URI there.
        if audience not in (GOOGLE_TOKEN_URI, f"{self.emulator.url}/token"):
            raise OAuthRefusalError(
                "invalid_grant",
                f"Invalid JWT: Failed audience check. The right audience is {GOOGLE_TOKEN_URI}",
            )
        _check_lifetime(claims)
        grant.scopes = scopes = tuple(str(claims.get("scope", "")).split())
        grant.subject = subject = str(claims.get("sub", ""))
        if not scopes:
            raise OAuthRefusalError("invalid_scope", "Empty or missing scope not allowed.")
        if not subject:
            # A service account acting as itself has no mailbox; the emulator has nothing to
            # give it (at Google the token works, and Gmail refuses it: failedPrecondition).
            raise OAuthRefusalError("invalid_grant", "The Gmail emulator needs a sub (delegation).")
        is_mailbox = subject.casefold() == self.emulator.address.casefold()
        if not is_mailbox or not set(scopes) <= set(account.delegated_scopes):
            raise OAuthRefusalError("unauthorized_client", _UNAUTHORIZED_CLIENT, 401)
        return Response.json(
            200,
            {
                "access_token": self.emulator.issue_access_token(),
                "expires_in": _ACCESS_TOKEN_LIFETIME,
                "token_type": "Bearer",
            },
        )


def _authorize_problem(params: dict[str, str]) -> tuple[str, str] | None:
    """What Google's consent screen would show as an error page instead, if anything."""
    response_type = params.get("response_type")
    if response_type is None:
        return "invalid_request", "Required parameter is missing: response_type"
    if response_type != "code":
        return "unsupported_response_type", f"Invalid response_type: {response_type}"
    scope = params.get("scope", "").split()
    if not scope:
        return "invalid_request", "Missing required parameter: scope"
    unknown = [s for s in scope if s not in KNOWN_SCOPES]
    if unknown:
        return "invalid_scope", f"Some requested scopes were invalid. {{invalid={unknown}}}"
    if params.get("access_type", "online") not in ("online", "offline"):
        return "invalid_request", f"Invalid access_type: {params['access_type']}"
    prompts = params.get("prompt", "").split()
    if any(p not in ("none", "consent", "select_account") for p in prompts):
        return "invalid_request", f"Invalid prompt: {params['prompt']}"
    method = params.get("code_challenge_method")
    if method is not None and "code_challenge" not in params:
        return "invalid_request", "code_challenge_method without code_challenge"
    if method not in (None, "S256", "plain"):
        return "invalid_request", f"Invalid code_challenge_method: {method}"
    challenge = params.get("code_challenge")
    if challenge is not None and not 43 <= len(challenge) <= 128:
        return "invalid_request", "Invalid code_challenge length"
    return None


def _is_loopback(uri: str) -> bool:
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition(":")[0] if parts.port else parts.netloc
    return parts.scheme == "http" and host.lower() in _LOOPBACK_HOSTS


def _challenge(verifier: str, method: str) -> str:
    if method == "S256":
        digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
    return verifier


def _split_jwt(assertion: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    try:
        head, body, sig = assertion.split(".")
        header = json.loads(_b64url(head))
        claims = json.loads(_b64url(body))
        signature = _b64url(sig)
    except (ValueError, binascii.Error):
        raise OAuthRefusalError("invalid_grant", "Invalid JWT Signature.") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise OAuthRefusalError("invalid_grant", "Invalid JWT Signature.")
    return header, claims, f"{head}.{body}".encode("ascii"), signature


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_lifetime(claims: dict[str, Any]) -> None:
    iat, exp, now = claims.get("iat"), claims.get("exp"), time.time()
    if not isinstance(iat, int | float) or not isinstance(exp, int | float):
        raise OAuthRefusalError("invalid_grant", _BAD_LIFETIME)
    if exp - iat > _MAX_ASSERTION_LIFETIME or iat > now + _CLOCK_SKEW or exp < now - _CLOCK_SKEW:
        raise OAuthRefusalError("invalid_grant", _BAD_LIFETIME)


#: Shaped like the pages Google's front ends serve for a 5xx: the title comes after the head's
#: boilerplate and a style sheet follows it, so quoting the page's start says nothing.
_FRONT_END_ERROR_PAGE = """<!DOCTYPE html>
<html lang=en>
  <meta charset=utf-8>
  <meta name=viewport content="initial-scale=1, minimum-scale=1, width=device-width">
  <title>Error {status} ({phrase})!!1</title>
  <style>
    *{{margin:0;padding:0}}html,code{{font:15px/22px arial,sans-serif}}html{{background:#fff;
    color:#222;padding:15px}}body{{margin:7% auto 0;max-width:390px;min-height:180px}}
  </style>
  <p><b>{status}.</b> <ins>That's an error.</ins>
  <p>The server encountered a temporary error and could not complete your request.
  <p>Please try again in 30 seconds. <ins>That's all we know.</ins>
"""


def token_fault_response(fault: Fault) -> Response:
    """An injected fault at ``/token``, as Google's token endpoint fails: its JSON error, with
    ``fault.reason`` as the code (``temporarily_unavailable`` when none is given); or, when the
    fault's headers give a ``text/html`` Content-Type, the bare error page a front end serves
    when the endpoint behind it is down, which is not JSON at all.

    The shape matters: google-auth decides from it, not from the status alone, whether a
    failed refresh may be tried again.
    """
    phrase = HTTPStatus(fault.status).phrase
    if any(
        key.lower() == "content-type" and value.startswith("text/html")
        for key, value in fault.headers.items()
    ):
        page = _FRONT_END_ERROR_PAGE.format(status=fault.status, phrase=escape(phrase))
        return Response(fault.status, page.encode("utf-8"), dict(fault.headers))
    description = phrase if fault.message == Fault.message else fault.message
    payload = {"error": fault.reason or "temporarily_unavailable", "error_description": description}
    return Response.json(fault.status, payload, fault.headers)


def _error_page(status: int, error: str, detail: str) -> Response:
    """The page Google shows in the browser when it cannot send the user back to the app."""
    html = (
        "<!doctype html><title>Error</title><h1>Access blocked: authorisation error</h1>"
        f"<p>Error {status}: {escape(error)}</p><p>{escape(detail)}</p>"
    )
    return Response(status, html.encode("utf-8"), {"Content-Type": "text/html; charset=utf-8"})
