"""How the Stripe emulator reads a request: form-encoded parameters and the Search query language.

**Parameters.** stripe-python sends GET parameters in the query string and POST parameters as
``application/x-www-form-urlencoded``, nesting with brackets: ``expand[0]=data.subscriptions``,
``created[gte]=1700000000``, ``features[invoice_history][enabled]=true``. :func:`decode_params`
turns those pairs back into dicts and lists; the ``read_*`` functions check a value the way Stripe
does and raise :class:`StripeAPIError` with Stripe's wording when it is wrong.

**Search.** Stripe documents the language at https://stripe.com/docs/search. What :func:`parse`
keeps:

* A clause is ``field``, operator, value: ``email:"amy@rocketrides.io"``. String values must be
  quoted (``\\"`` escapes a quote); numbers may be bare. ``-`` before a clause negates it, and
  ``null`` (any case) tests that a field is empty: ``-metadata["plan"]:null``.
* Clauses are joined by spaces or ``AND``, or by ``OR`` (keywords in any case); one query may not
  mix AND with OR, there are no parentheses, and at most 10 clauses.
* ``:`` on a *string* field (email, name, phone) matches case-insensitively when the record holds
  all the query's words in the same order; ``~`` is a case-insensitive substring match of at least
  3 characters. ``:`` on a *token* field (metadata) is case-insensitive equality. *Numeric* fields
  (created) also take ``>``, ``<``, ``>=``, ``<=``. Any other operator on a field is an error.

Where Stripe's wording is known ("We were unable to parse your search query.", "Field `x` is an
unsupported search field ...", "Missing required param: x.") it is reproduced; the rest is ours.
"""

from __future__ import annotations

import base64
import binascii
import operator
import re
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Searchable customer fields and their Stripe field types.
CUSTOMER_FIELDS: Mapping[str, str] = {
    "created": "numeric",
    "email": "string",
    "metadata": "token",
    "name": "string",
    "phone": "string",
}
MAX_CLAUSES = 10
MIN_SUBSTRING = 3

_BOUNDS: Mapping[str, Callable[[float, float], bool]] = {
    ":": operator.eq,
    "gt": operator.gt,
    ">": operator.gt,
    "gte": operator.ge,
    ">=": operator.ge,
    "lt": operator.lt,
    "<": operator.lt,
    "lte": operator.le,
    "<=": operator.le,
}
_OPERATORS: Mapping[str, frozenset[str]] = {
    "string": frozenset({":", "~"}),
    "token": frozenset({":"}),
    "numeric": frozenset({":", ">", "<", ">=", "<="}),
}
_PARAM_NAME = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_CLAUSE = re.compile(
    r"""(?P<neg>-)?(?P<field>[a-z_]+)(?:\["(?P<key>(?:[^"\\]|\\.)*)"\])?
        (?P<op>>=|<=|:|~|>|<)
        (?:"(?P<text>(?:[^"\\]|\\.)*)"|(?P<number>-?\d+(?:\.\d+)?)|(?P<null>null)(?![\w"]))""",
    re.VERBOSE | re.IGNORECASE,
)
_KEYWORD = re.compile(r"(AND|OR)(?=\s|$)", re.IGNORECASE)
_UNPARSABLE = "We were unable to parse your search query."


@dataclass(eq=False)
class StripeAPIError(Exception):
    """A refusal in Stripe's error shape: ``{"error": {"type", "code", "message", "param"}}``."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    kind: str = "invalid_request_error"  # the error body's ``type``
    headers: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def missing(param: str) -> StripeAPIError:
    """A required parameter was not sent."""
    return StripeAPIError(400, f"Missing required param: {param}.", "parameter_missing", param)


def no_such(kind: str, ident: object, param: str, *, status: int = 400) -> StripeAPIError:
    """A parameter names an object that does not exist."""
    return StripeAPIError(status, f"No such {kind}: '{ident}'", "resource_missing", param)


def invalid_choice(param: str, choices: Collection[str]) -> StripeAPIError:
    """A parameter is not one of the values it may take."""
    message = f"Invalid {param}: must be one of {', '.join(sorted(choices))}"
    return StripeAPIError(400, message, param=param)


# -- parameters -----------------------------------------------------------------------------------


def decode_params(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Pairs such as ``("expand[0]", "a")`` and ``("created[gte]", "1")`` as nested values."""
    root: dict[str, Any] = {}
    for name, value in pairs:
        found = _PARAM_NAME.fullmatch(name)
        path = [found[1], *re.findall(r"\[([^\[\]]*)\]", found[2])] if found else [name]
        node = root
        for part in path[:-1]:
            node = node.setdefault(part or str(len(node)), {})
            if not isinstance(node, dict):
                message = f"Invalid {path[0]}: a value cannot also be a hash"
                raise StripeAPIError(400, message, "parameter_invalid", path[0])
        node[path[-1] or str(len(node))] = value  # ``expand[]=a`` appends, like ``expand[0]=a``
    return {k: _lists(v) for k, v in root.items()}


def read_integer(value: Any, param: str) -> int:
    """``value`` as an integer."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    raise StripeAPIError(400, f"Invalid integer: {value}", "parameter_invalid_integer", param)


def read_limit(params: Mapping[str, Any]) -> int:
    """A list's ``limit``: 1 to 100, 10 when absent."""
    limit = read_integer(params.get("limit", "10"), "limit")
    if not 1 <= limit <= 100:
        message = (
            "This value must be greater than or equal to 1."
            if limit < 1
            else f"This value must be less than or equal to 100 (it currently is '{limit}')."
        )
        raise StripeAPIError(400, message, "parameter_invalid_integer", "limit")
    return limit


def read_bool(params: Mapping[str, Any], param: str) -> bool:
    """A ``true``/``false`` parameter."""
    if params[param] not in ("true", "false"):
        raise StripeAPIError(400, f"Invalid boolean: {params[param]}", "parameter_invalid", param)
    return bool(params[param] == "true")


def read_expand(params: Mapping[str, Any], allowed: Collection[str]) -> set[str]:
    """The ``expand[]`` paths asked for, each of which must be in ``allowed``."""
    raw = params.get("expand", [])
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise StripeAPIError(400, "Invalid array", "parameter_invalid", "expand")
    for value in values:
        if value not in allowed:
            message = f"This property cannot be expanded ({value})."
            raise StripeAPIError(400, message, param="expand")
    return set(values)


def created_ok(params: Mapping[str, Any], created: int) -> bool:
    """Whether ``created`` passes the ``created`` filter: a timestamp, or gt/gte/lt/lte bounds."""
    bounds = params.get("created")
    if bounds is None:
        return True
    if not isinstance(bounds, dict):
        return created == read_integer(bounds, "created")
    for name, bound in bounds.items():
        if name not in ("gt", "gte", "lt", "lte"):
            message = f"Received unknown parameter: created[{name}]"
            raise StripeAPIError(400, message, "parameter_unknown", f"created[{name}]")
        if not _BOUNDS[name](created, read_integer(bound, f"created[{name}]")):
            return False
    return True


def form_booleans(value: Any) -> Any:
    """``value`` with every ``"true"``/``"false"`` inside turned into a bool."""
    if isinstance(value, dict):
        return {k: form_booleans(v) for k, v in value.items()}
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


def is_url(value: object) -> bool:
    """Whether ``value`` is an absolute http(s) URL."""
    parts = urllib.parse.urlsplit(str(value))
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def page_token(offset: int) -> str:
    """A search result's ``next_page``: opaque to clients, it only has to survive the trip."""
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode("ascii")


def page_offset(token: object) -> int:
    """Where the search page named by ``token`` (the ``page`` parameter) starts."""
    if token is None:
        return 0
    try:
        label, _, offset = base64.urlsafe_b64decode(str(token)).decode("ascii").partition(":")
        if label == "offset" and offset.isdigit():
            return int(offset)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise StripeAPIError(400, f"Invalid page: {token}", "parameter_invalid", "page")


def _lists(value: Any) -> Any:
    """Turn ``{"0": a, "1": b}`` (how ``x[0]=a&x[1]=b`` decodes) into ``[a, b]``."""
    if not isinstance(value, dict):
        return value
    items = {k: _lists(v) for k, v in value.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


# -- search ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """One ``field operator value`` test."""

    field: str
    key: str | None  # the metadata key, for ``metadata["key"]``
    operator: str
    value: str | float | None  # None means ``null``
    negated: bool = False

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` (an API object as a mapping) satisfies this clause."""
        return self._test(record) != self.negated

    def _test(self, record: Mapping[str, Any]) -> bool:
        actual = record.get(self.field)
        if self.key is not None:
            actual = (actual or {}).get(self.key)
        if self.value is None:
            return actual in (None, "")
        if actual is None:
            return False
        if isinstance(self.value, float):
            return _BOUNDS[self.operator](float(actual), self.value)
        wanted, held = self.value.casefold(), str(actual).casefold()
        if self.operator == "~":
            return wanted in held
        if self.key is not None:  # token fields compare whole values
            return wanted == held
        return _holds_words(held.split(), wanted.split())


@dataclass(frozen=True)
class Query:
    """A parsed query: clauses all joined by AND, or all by OR."""

    clauses: tuple[Clause, ...]
    conjunction: str = "AND"

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` is in the query's results."""
        results = (clause.matches(record) for clause in self.clauses)
        return any(results) if self.conjunction == "OR" else all(results)


def parse(text: str, fields: Mapping[str, str], resource: str) -> Query:
    """Parse the ``query`` parameter for a resource whose ``fields`` map names to field types."""
    clauses: list[Clause] = []
    keywords: set[str] = set()
    expect_clause = True
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            break
        keyword = _KEYWORD.match(text, position)
        if keyword and not expect_clause:
            keywords.add(keyword[1].upper())
            expect_clause = True
            position = keyword.end()
            continue
        match = _CLAUSE.match(text, position)
        if match is None:
            raise _bad_query(_UNPARSABLE)
        clauses.append(_clause(match, fields, resource))
        expect_clause = False
        position = match.end()
    if not clauses or (expect_clause and keywords):
        raise _bad_query(_UNPARSABLE)
    if len(keywords) > 1:
        raise _bad_query(f"{_UNPARSABLE} AND and OR cannot be combined in one query.")
    if len(clauses) > MAX_CLAUSES:
        raise _bad_query(f"{_UNPARSABLE} A query may have at most {MAX_CLAUSES} clauses.")
    return Query(tuple(clauses), keywords.pop() if keywords else "AND")


def _clause(match: re.Match[str], fields: Mapping[str, str], resource: str) -> Clause:
    name, op, key = match["field"], match["op"], match["key"]
    kind = fields.get(name)
    if kind is None or (key is None) == (kind == "token"):
        shown = f'{name}["{key}"]' if key is not None else name
        raise _bad_query(
            f"Field `{shown}` is an unsupported search field for resource `{resource}`. See "
            f"http://stripe.com/docs/search#query-fields-for-{resource} for a list of supported "
            "fields."
        )
    if op not in _OPERATORS[kind]:
        raise _bad_query(f"The `{op}` operator is not supported on {kind} field `{name}`.")
    key = _unescape(key) if key is not None else None
    if match["null"] is not None:
        if op != ":":
            raise _bad_query(f"`null` can only be used with the `:` operator, not `{op}`.")
        return Clause(name, key, op, None, bool(match["neg"]))
    raw = match["text"] if match["text"] is not None else match["number"]
    value: str | float = _unescape(raw)
    if kind == "numeric":
        try:
            value = float(value)
        except ValueError:
            raise _bad_query(f"Field `{name}` takes a number, not {raw!r}.") from None
    elif match["text"] is None:
        raise _bad_query(f'{_UNPARSABLE} String values must be quoted: {name}{op}"{raw}".')
    if op == "~" and len(str(value)) < MIN_SUBSTRING:
        raise _bad_query(
            f"Substring search on `{name}` needs at least {MIN_SUBSTRING} characters, "
            f"got {value!r}."
        )
    return Clause(name, key, op, value, bool(match["neg"]))


def _bad_query(message: str) -> StripeAPIError:
    return StripeAPIError(400, message, param="query")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _holds_words(held: list[str], wanted: list[str]) -> bool:
    if not wanted:
        return not held
    width = len(wanted)
    return any(held[i : i + width] == wanted for i in range(len(held) - width + 1))
