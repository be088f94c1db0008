"""The Gmail API's surface as the emulator serves it: routes, parameter checks, errors, quota.

Everything here comes from the discovery document google-api-python-client ships
(``googleapiclient/discovery_cache/documents/gmail.v1.json``), read lazily on first use. A request
the real API would refuse for its shape (an unknown method, query parameter or body field, a
value of the wrong type) is refused here with the 400 or 404 Google sends, so the emulator cannot
quietly accept what Gmail would not. :class:`GmailApiError` renders Google's error body.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import importlib.resources
import json
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from billing_responder.sandbox._http import Response

#: Quota units per method, from Gmail's published usage limits.
QUOTA_UNITS: Mapping[str, int] = {
    "getProfile": 1, "watch": 100, "stop": 50,
    "drafts.create": 10, "drafts.delete": 10, "drafts.get": 5, "drafts.list": 5,
    "drafts.send": 100, "drafts.update": 15, "history.list": 2,
    "labels.create": 5, "labels.delete": 5, "labels.get": 1, "labels.list": 1,
    "labels.patch": 5, "labels.update": 5,
    "messages.attachments.get": 5, "messages.batchDelete": 50, "messages.batchModify": 50,
    "messages.delete": 10, "messages.get": 5, "messages.import": 25, "messages.insert": 25,
    "messages.list": 5, "messages.modify": 5, "messages.send": 100, "messages.trash": 5,
    "messages.untrash": 5, "settings.sendAs.list": 1,
    "threads.delete": 20, "threads.get": 10, "threads.list": 10, "threads.modify": 10,
    "threads.trash": 10, "threads.untrash": 10,
}  # fmt: skip

INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
    "or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
MISSING_CREDENTIALS = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
#: What Gmail says when the per-user "Queries per minute" quota runs out.
QUOTA_MESSAGE = (
    "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute per user' of service "
    "'gmail.googleapis.com' for consumer 'project_number:0'."
)
#: Reasons Google files under the ``usageLimits`` domain rather than ``global``.
USAGE_LIMIT_REASONS = frozenset({"userRateLimitExceeded", "dailyLimitExceeded", "quotaExceeded"})

# status -> (google.rpc code name, errors[0].reason, the message Google gives when it says no more)
_STATUS = {
    400: ("INVALID_ARGUMENT", "badRequest", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "authError", INVALID_CREDENTIALS),
    403: ("PERMISSION_DENIED", "forbidden", "The caller does not have permission"),
    404: ("NOT_FOUND", "notFound", "Requested entity was not found."),
    409: ("ABORTED", "aborted", "The operation was aborted."),
    429: ("RESOURCE_EXHAUSTED", "rateLimitExceeded",
          "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "backendError", "Internal error encountered."),
    501: ("UNIMPLEMENTED", "notImplemented", "Operation is not implemented, or supported."),
    502: ("UNAVAILABLE", "backendError", "The service is currently unavailable."),
    503: ("UNAVAILABLE", "backendError", "The service is currently unavailable."),
    504: ("DEADLINE_EXCEEDED", "backendError", "The request timed out."),
}  # fmt: skip


class GmailApiError(Exception):
    """An answer in Google's error shape, raised anywhere below ``route`` and rendered there.

    ``reason`` and ``message`` default to what Google sends for ``status``.
    """

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        reason: str | None = None,
        domain: str | None = "global",
        location: tuple[str, str] | None = None,  # (name, "parameter" | "header")
        headers: Mapping[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        name, default_reason, default_message = _STATUS.get(status, ("UNKNOWN", "unknown", ""))
        self.status = status
        self.message = message or default_message
        self.status_name = name
        self.reason = reason or default_reason
        self.domain = domain
        self.location = location
        self.headers = dict(headers or {})
        self.details = details
        super().__init__(f"{status} {self.message}")

    def response(self, *, errors_array: bool = True) -> Response:
        """The HTTP answer. Gmail carries ``errors[]`` unless the request said ``$.xgafv=2``."""
        error: dict[str, Any] = {"code": self.status, "message": self.message}
        if errors_array:
            entry: dict[str, str] = {"message": self.message}
            if self.domain:
                entry["domain"] = self.domain
            entry["reason"] = self.reason
            if self.location:
                entry["location"], entry["locationType"] = self.location
            error["errors"] = [entry]
        error["status"] = self.status_name
        if self.details:
            error["details"] = self.details
        return Response.json(self.status, {"error": error}, self.headers)


def bad_request(message: str, reason: str = "invalidArgument") -> GmailApiError:
    """Gmail's own 400 for a request it understood but will not do."""
    return GmailApiError(400, message, reason=reason)


def not_found() -> GmailApiError:
    """Gmail's 404, which names nothing."""
    return GmailApiError(404)


# -- routes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One method of the discovery document."""

    http_method: str
    name: str  # the method id without "gmail.users.", e.g. "messages.get"
    pattern: re.Pattern[str]
    params: Mapping[str, Mapping[str, Any]]
    request_schema: str | None


@functools.cache
def discovery() -> Mapping[str, Any]:
    """The Gmail v1 discovery document of the installed client."""
    folder = importlib.resources.files("googleapiclient") / "discovery_cache/documents"
    return cast(Mapping[str, Any], json.loads((folder / "gmail.v1.json").read_text("utf-8")))


@functools.cache
def _routes() -> tuple[Route, ...]:
    routes: list[Route] = []

    def walk(resources: Mapping[str, Any]) -> None:
        for resource in resources.values():
            for method in resource.get("methods", {}).values():
                template = method.get("flatPath") or method["path"]
                regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape("/" + template))
                routes.append(
                    Route(
                        http_method=method["httpMethod"],
                        name=method["id"].removeprefix("gmail.users."),
                        pattern=re.compile(regex + "$"),
                        params=method.get("parameters", {}),
                        request_schema=method.get("request", {}).get("$ref"),
                    )
                )
            walk(resource.get("resources", {}))

    walk(discovery()["resources"])
    # Literal segments win over placeholders: /messages/send is not /messages/{id}.
    routes.sort(key=lambda r: -len(re.sub(r"\(\?P<\w+>\[\^/\]\+\)", "", r.pattern.pattern)))
    return tuple(routes)


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The method a request is for, and its decoded path parameters; else Google's 404."""
    for candidate in _routes():
        found = candidate.pattern.match(path)
        if found and candidate.http_method == method:
            return candidate, {k: urllib.parse.unquote(v) for k, v in found.groupdict().items()}
    raise GmailApiError(404, "Method not found.")


# -- parameters and bodies -----------------------------------------------------------------------


def validate_query(route: Route, query: Mapping[str, list[str]]) -> dict[str, Any]:
    """The query string typed as the discovery document says (lists for repeated parameters)."""
    standard = discovery()["parameters"]
    values: dict[str, Any] = {}
    for name, raw in query.items():
        spec = route.params.get(name) or standard.get(name)
        if spec is None or spec.get("location") != "query":
            binding = f"Field '{name}' could not be found in request message."
            raise _unknown_name(name, f"Cannot bind query parameter. {binding}")
        typed = [_typed(name, spec, v) for v in raw]
        values[name] = typed if spec.get("repeated") else typed[0]
    for name, spec in route.params.items():
        if spec.get("required") and spec.get("location") == "query" and name not in values:
            location = (name, "parameter")
            raise GmailApiError(400, f"Required parameter: {name}", reason="required",
                                location=location)  # fmt: skip
    if values.get("alt", "json") != "json":
        raise bad_request(f'Unsupported alt type "{values["alt"]}"', reason="badRequest")
    return values


def validate_body(route: Route, body: bytes) -> dict[str, Any]:
    """The JSON body, refusing fields the method's request schema does not have."""
    if route.request_schema is None or not body.strip():
        return {}
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise bad_request("Invalid JSON payload received.", reason="badRequest")
    _check_fields(route.request_schema, payload, "")
    return payload


def _check_fields(schema: str, payload: Mapping[str, Any], at: str) -> None:
    """Refuse fields ``schema`` does not have, in nested objects too (a draft's ``message``)."""
    known = discovery()["schemas"][schema]["properties"]
    for name, value in payload.items():
        path = f"{at}.{name}" if at else name
        if name not in known:
            raise _unknown_name(name, "Cannot find field.", at=_snake(at))
        nested = known[name].get("$ref")
        if nested is not None:
            if not isinstance(value, dict):
                raise bad_request(f"Invalid value at '{_snake(path)}'", reason="invalid")
            _check_fields(nested, value, path)
        if known[name].get("type") == "array" and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise bad_request(f"Invalid value at '{_snake(path)}'", reason="invalid")


def _typed(name: str, spec: Mapping[str, Any], value: str) -> object:
    """One query value converted as its discovery type says, or the 400 Google gives for it."""
    kind, fmt = spec.get("type"), spec.get("format", "")
    if kind == "boolean" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    unsigned = fmt.startswith("uint")
    if kind == "integer" and re.fullmatch(r"\d+" if unsigned else r"-?\d+", value):
        return int(value)
    if kind == "string" and "enum" in spec:
        for option in spec["enum"]:
            if option.lower() == value.lower():
                return option
    elif kind == "string" and fmt in ("int64", "uint64"):
        if re.fullmatch(r"\d+", value):
            return value
    elif kind == "string":
        return value
    if "enum" in spec:
        proto = "TYPE_ENUM"
    else:
        proto = "TYPE_BOOL" if kind == "boolean" else f"TYPE_{(fmt or 'string').upper()}"
    message = f"Invalid value at '{_snake(name)}' ({proto}), \"{value}\""
    # The proto layer's refusal is the one Google error whose errors[] entry has no domain.
    raise GmailApiError(400, message, reason="invalid", domain=None)


def _unknown_name(name: str, where: str, *, at: str = "") -> GmailApiError:
    # Google names the object holding an unknown field, when it is not the body itself.
    place = f" at '{at}'" if at else ""
    message = f'Invalid JSON payload received. Unknown name "{name}"{place}: {where}'
    violation = {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"description": message}],
    }
    return GmailApiError(400, message, reason="badRequest", details=[violation])


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


# -- paging --------------------------------------------------------------------------------------

Key = tuple[int, ...]


def page(
    items: Sequence[Any], keys: Sequence[Key], params: Mapping[str, Any]
) -> tuple[list[Any], str | None]:
    """One page of ``items`` (sorted by ``keys``) and the token of the next page.

    The token holds the sort key of the last item shown rather than an offset, so a caller that
    works through ``is:unread`` page by page, marking each page read, still gets every message.
    """
    size = min(max(params.get("maxResults", 100), 1), 500)
    start = 0
    token = params.get("pageToken")
    if token:
        try:
            text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
            after = tuple(int(part) for part in text.split(","))
        except (ValueError, binascii.Error):
            raise bad_request("Invalid pageToken") from None
        start = bisect.bisect_right(keys, after)
    shown = list(items[start : start + size])
    if start + size >= len(items):
        return shown, None
    return shown, b64url(",".join(map(str, keys[start + size - 1])).encode("ascii"))


def listing(name: str, items: list[Any], token: str | None, total: int) -> dict[str, Any]:
    """A list response as Gmail shapes it: the list key is absent when nothing matched."""
    result: dict[str, Any] = {name: items} if items else {}
    if token:
        result["nextPageToken"] = token
    return result | {"resultSizeEstimate": total}


def b64url(data: bytes) -> str:
    """Base64url with padding, as Gmail writes ``raw`` and body ``data``."""
    return base64.urlsafe_b64encode(data).decode("ascii")
