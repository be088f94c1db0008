"""Gmail's search language (the ``q`` of messages.list), the part a responder uses.

:func:`parse` turns a query into a small tree of :class:`Term`, :class:`Not`, :class:`And` and
:class:`Or`; :func:`matches` evaluates it against a :class:`SearchDoc`. The grammar follows
Gmail's search box (support.google.com/mail/answer/7190):

* terms separated by spaces are ANDed; ``AND`` may be written but changes nothing;
* ``OR`` (upper case) and ``{a b}`` are disjunctions, and ``OR`` binds tighter than the implicit
  AND, so ``a b OR c`` is ``a AND (b OR c)``, as in Google search;
* ``-term`` and ``NOT term`` negate; ``( )`` groups; ``"..."`` is a phrase;
* ``op:value``, ``op:"a phrase"``, ``op:(a OR b)`` scope words to a field.

Like Gmail the parser never rejects a query: an unknown ``op:`` is searched as text, an
unbalanced parenthesis is closed at the end, and a value Gmail cannot read (a bad date) matches
nothing.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

TEXT = "text"  # the field of a bare word: subject, addresses and body

#: Operators whose value is searched as words in one field.
_WORD_FIELDS = frozenset({"subject", "from", "to", "cc", "bcc"})
#: Operators Gmail knows; any other ``name:value`` is plain text.
OPERATORS = _WORD_FIELDS | frozenset(
    {
        "label", "is", "in", "has", "category", "rfc822msgid",
        "newer_than", "older_than", "after", "before", "newer", "older",
    }
)  # fmt: skip

_WORD = re.compile(r"\w+")
_SPECIALS = '(){}"'
_DURATION = re.compile(r"^(\d+)([dmyh])$")
_DURATION_MS = {"h": 3_600_000, "d": 86_400_000, "m": 30 * 86_400_000, "y": 365 * 86_400_000}
_CATEGORIES = {
    "primary": "CATEGORY_PERSONAL",
    "social": "CATEGORY_SOCIAL",
    "promotions": "CATEGORY_PROMOTIONS",
    "updates": "CATEGORY_UPDATES",
    "forums": "CATEGORY_FORUMS",
}


@dataclass(frozen=True)
class Term:
    """One search term: ``field`` is an operator name, or :data:`TEXT` for a bare word; a
    ``value`` of several words (a quoted phrase) matches only as consecutive words."""

    field: str
    value: str


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


Node = Term | Not | And | Or


@dataclass(frozen=True)
class SearchDoc:
    """What a query can see of one message. Header texts are already RFC 2047-decoded."""

    subject: str
    from_: Sequence[str]  # each "Display Name <addr@host>"
    to: Sequence[str]
    cc: Sequence[str]
    bcc: Sequence[str]
    body: str
    label_ids: frozenset[str]
    internal_date_ms: int
    message_id: str
    has_attachment: bool = False


@dataclass(frozen=True)
class SearchContext:
    """The mailbox around a message: the clock and the label names."""

    now_ms: int
    #: Label ids whose name matches a ``label:`` value, spelled as Gmail allows.
    resolve_label: Callable[[str], frozenset[str]]
    _cache: dict[str, frozenset[str]] = field(default_factory=dict, compare=False)

    def labels(self, name: str) -> frozenset[str]:
        if name not in self._cache:
            self._cache[name] = self.resolve_label(name)
        return self._cache[name]


# -- parsing -------------------------------------------------------------------------------------


def parse(query: str) -> Node:
    """The tree of ``query``; an empty query is an empty :class:`And`, which matches everything."""
    return _Parser(query).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> Node:
        node = self._sequence(scope=None, closer=None)
        while self._peek() is not None:  # a stray closer: Gmail ignores it and reads on
            self.pos += 1
            more = self._sequence(scope=None, closer=None)
            node = _and([node, more])
        return node

    # Each method takes ``scope``: the operator a bare word inside ``op:( ... )`` belongs to.

    def _sequence(self, scope: str | None, closer: str | None) -> Node:
        items: list[Node] = []
        while True:
            char = self._peek()
            if char is None or char in ")}":
                if char is not None and char == closer:
                    self.pos += 1
                return _and(items)
            if self._keyword("AND"):
                continue
            items.append(self._disjunction(scope))

    def _disjunction(self, scope: str | None) -> Node:
        options = [self._unary(scope)]
        while self._keyword("OR"):
            if self._peek() in (None, ")", "}"):
                break
            options.append(self._unary(scope))
        return options[0] if len(options) == 1 else Or(tuple(options))

    def _unary(self, scope: str | None) -> Node:
        if self._keyword("NOT"):
            return Not(self._unary(scope))
        if self.text.startswith("-", self.pos) and self._at_term(self.pos + 1):
            self.pos += 1
            return Not(self._unary(scope))
        return self._primary(scope)

    def _primary(self, scope: str | None) -> Node:
        char = self._peek()
        if char == "(":
            self.pos += 1
            return self._sequence(scope, ")")
        if char == "{":
            self.pos += 1
            inner = self._sequence(scope, "}")
            return Or(inner.children) if isinstance(inner, And) and inner.children else inner
        if char == '"':
            return Term(scope or TEXT, self._quoted())
        word = self._word()
        name, colon, value = word.partition(":")
        op = name.lower()
        if colon and op in OPERATORS:
            if value:
                return Term(op, value)
            following = self.text[self.pos : self.pos + 1]
            if following in ("(", "{", '"'):
                return self._primary(op)
            return Term(op, "")
        return Term(scope or TEXT, word)

    # -- lexing helpers ----------------------------------------------------------------------

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def _peek(self) -> str | None:
        self._skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else None

    def _at_term(self, pos: int) -> bool:
        return pos < len(self.text) and not self.text[pos].isspace() and self.text[pos] not in ")}"

    def _keyword(self, word: str) -> bool:
        self._skip_space()
        end = self.pos + len(word)
        if self.text.startswith(word, self.pos) and (
            end == len(self.text) or self.text[end].isspace() or self.text[end] in "({"
        ):
            self.pos = end
            return True
        return False

    def _quoted(self) -> str:
        end = self.text.find('"', self.pos + 1)
        end = len(self.text) if end == -1 else end
        value = self.text[self.pos + 1 : end]
        self.pos = min(end + 1, len(self.text))
        return value

    def _word(self) -> str:
        start = self.pos
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char.isspace() or char in _SPECIALS:
                break
            self.pos += 1
        if self.pos == start:  # a lone special character: skip it so parsing always advances
            self.pos += 1
        return self.text[start : self.pos]


def _and(items: Sequence[Node]) -> Node:
    return items[0] if len(items) == 1 else And(tuple(items))


# -- evaluation ----------------------------------------------------------------------------------


def matches(node: Node, doc: SearchDoc, ctx: SearchContext) -> bool:
    """Whether ``doc`` is a result of the query ``node``."""
    if isinstance(node, And):
        return all(matches(child, doc, ctx) for child in node.children)
    if isinstance(node, Or):
        return any(matches(child, doc, ctx) for child in node.children)
    if isinstance(node, Not):
        return not matches(node.child, doc, ctx)
    return _term(node, doc, ctx)


def mentions_anywhere(node: Node) -> bool:
    """Whether the query asks for ``in:anywhere``, which lifts the Spam and Trash exclusion."""
    return any(t.field == "in" and t.value.lower() == "anywhere" for t in _positive_terms(node))


def mentioned_labels(node: Node, ctx: SearchContext) -> frozenset[str]:
    """Label ids the query asks for positively (``in:trash`` does not hide Trash)."""
    found: set[str] = set()
    for term in _positive_terms(node):
        if term.field in ("label", "in", "is"):
            found |= ctx.labels(term.value)
    return frozenset(found)


def _positive_terms(node: Node, negated: bool = False) -> Iterable[Term]:
    if isinstance(node, Term):
        if not negated:
            yield node
    elif isinstance(node, Not):
        yield from _positive_terms(node.child, not negated)
    else:
        for child in node.children:
            yield from _positive_terms(child, negated)


def _term(term: Term, doc: SearchDoc, ctx: SearchContext) -> bool:
    op, value = term.field, term.value
    if op == TEXT:
        haystack = " ".join([doc.subject, *doc.from_, *doc.to, *doc.cc, doc.body])
        return _words_match(value, haystack)
    if op in _WORD_FIELDS:
        return _field_match(op, value, doc)
    if op in ("label", "in", "is"):
        return _label_match(op, value, doc, ctx)
    if op == "category":
        return _CATEGORIES.get(value.lower(), "-") in doc.label_ids
    if op == "has":
        return value.lower() == "attachment" and doc.has_attachment
    if op == "rfc822msgid":
        return bool(value) and value.strip("<>") == doc.message_id.strip().strip("<>")
    if op in ("newer_than", "older_than"):
        span = _duration_ms(value)
        if span is None:
            return False
        newer = doc.internal_date_ms >= ctx.now_ms - span
        return newer if op == "newer_than" else not newer
    moment = _date_ms(value)
    if moment is None:
        return False
    if op in ("after", "newer"):
        return doc.internal_date_ms >= moment
    return doc.internal_date_ms < moment  # before, older


def _label_match(op: str, value: str, doc: SearchDoc, ctx: SearchContext) -> bool:
    lowered = value.lower()
    if op == "in" and lowered == "anywhere":
        return True
    if op == "is" and lowered == "read":
        return "UNREAD" not in doc.label_ids
    return bool(ctx.labels(value) & doc.label_ids)


def _field_match(op: str, value: str, doc: SearchDoc) -> bool:
    if op == "subject":
        return _words_match(value, doc.subject)
    fields = {"from": doc.from_, "to": (*doc.to, *doc.cc, *doc.bcc), "cc": doc.cc, "bcc": doc.bcc}
    return any(_address_match(value, text) for text in fields[op])


def _address_match(value: str, text: str) -> bool:
    """``from:amy``, ``from:amy@example.com`` and ``from:example.com`` all find Amy."""
    wanted = value.lower()
    lowered = text.lower()
    if "@" in wanted or "." in wanted:
        return re.search(r"(?<![\w.+-])" + re.escape(wanted) + r"(?![\w-])", lowered) is not None
    return _words_match(value, text)


def _words_match(value: str, text: str) -> bool:
    """Every word of ``value`` occurs in ``text`` as consecutive whole words, case-insensitively.
    A value with no words at all (a lone ``-``) constrains nothing, as in Gmail."""
    wanted = [w.casefold() for w in _WORD.findall(value)]
    if not wanted:
        return True
    words = [w.casefold() for w in _WORD.findall(text)]
    width = len(wanted)
    return any(words[i : i + width] == wanted for i in range(len(words) - width + 1))


def _duration_ms(value: str) -> int | None:
    found = _DURATION.match(value.lower())
    return None if found is None else int(found.group(1)) * _DURATION_MS[found.group(2)]


def _date_ms(value: str) -> int | None:
    """``YYYY/MM/DD`` (midnight Pacific time, as the Gmail API documents) or epoch seconds."""
    if value.isdigit():
        return int(value) * 1000
    found = re.fullmatch(r"(\d{4})[/-](\d{1,2})[/-](\d{1,2})", value)
    if found is None:
        return None
    year, month, day_of_month = (int(g) for g in found.groups())
    try:
        day = dt.datetime(year, month, day_of_month, tzinfo=_pacific())
    except ValueError:
        return None
    return int(day.timestamp() * 1000)


def _pacific() -> dt.tzinfo:
    try:
        return zoneinfo.ZoneInfo("America/Los_Angeles")
    except zoneinfo.ZoneInfoNotFoundError:  # no tz database: standard time is close enough
        return dt.timezone(dt.timedelta(hours=-8))


def label_search_key(name: str) -> str:
    """A label name as Gmail search compares it: case-folded, and the characters Gmail treats
    alike in label names (space, ``/``, ``-``, ``&``, brackets, ``|``, quotes) all read as ``-``,
    so ``label:billing-replied`` finds the label ``Billing/Replied``."""
    return re.sub(r"[\s/\-&(){}|\"]+", "-", name.strip().casefold())
