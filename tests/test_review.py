"""The review page (issue 5): `once --dry-run --review DIR`, and what real headless Chromium shows.

One module-scoped dry run over a mixed mailbox — replies, skips, an escalation, a deferral, a
customer named ``<img src=x onerror=alert(1)>`` and a subject carrying a script and an injected
element that would mark the page if it ever ran — then Debian's ``chromium`` loads the index and
the hostile reply's preview, once each: ``--dump-dom`` gives the DOM after the page loaded (after
any script would have run), ``--screenshot`` proves it renders. Chromium gets no network: a dead
proxy and a resolver that resolves nothing. Without Chromium these tests fail: CI installs it.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path

import pytest

from billing_responder import billing, gmail
from billing_responder.pipeline import DRY_RUN_PORTAL_URL
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.demo import write_sandbox_config
from billing_responder.sandbox.gmail import GmailEmulator
from billing_responder.sandbox.inbox import person_mail, seed
from billing_responder.sandbox.stripe import StripeEmulator
from tests.conftest import CliResult, Sandbox

HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_SUBJECT = (
    "Invoice \"><script>document.title='PWNED'</script>"
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
)
#: Whatever the page shows must come from our templates: none of these may exist in its DOM.
FORBIDDEN_TAGS = {"script", "img", "object", "embed", "form", "input", "base", "link", "svg"}
EXPECTED_STATUS = {"reply": "would reply", "skip": "skipped", "escalate": "would escalate"}
WINDOW = (1200, 2000)
# A blank page of this size screenshots to about 11 KB, one line of text to 16 KB (measured with
# Debian's chromium 156); the review index is several hundred.
NON_TRIVIAL_PNG_BYTES = 50_000


# -- the browser ----------------------------------------------------------------------------------


def chromium() -> str:
    """Debian's Chromium, or a failing test that says how to install it."""
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("the review page is checked in real headless Chromium: apt-get install chromium")
    return found


@dataclass(frozen=True)
class Loaded:
    """A page as Chromium left it: the serialised DOM and a screenshot."""

    dom: str
    screenshot: Path


def load_in_chromium(page: Path, work: Path) -> Loaded:
    """Load ``page`` once in headless Chromium: its DOM after loading, and a screenshot."""
    png = work / f"{page.stem}.png"
    command = [
        chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
        f"--user-data-dir={work / 'profile'}", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions",
        # Nothing may leave the machine: every request would go to a dead local proxy, and no
        # name resolves.
        "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={png}", "--dump-dom",
        page.as_uri(),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        # A load takes a second or two. One that never ends is typically a page stuck in a
        # dialog: a hostile alert(1) that ran.
        pytest.fail(f"chromium did not finish loading {page} within 60 s (a script stuck in"
                    " alert()? then a hostile payload ran)")
    assert done.returncode == 0, f"chromium failed on {page}: {done.stderr[-2000:]}"
    return Loaded(done.stdout, png)


# -- reading a DOM ---------------------------------------------------------------------------------


@dataclass
class Element:
    """One element of a parsed document, with the text of everything inside it."""

    tag: str
    attrs: dict[str, str | None]
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The element's text, white space collapsed."""
        return " ".join("".join(self.parts).split())


class Dom(HTMLParser):
    """A serialised document as a flat list of elements (enough to ask what is shown)."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                      "source", "track", "wbr"})

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs))
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.parts.append(data)

    def find(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Elements with this tag (any, when None) whose attributes have these values."""
        return [
            e for e in self.elements
            if (tag is None or e.tag == tag)
            and all(e.attrs.get(name.replace("_", "-")) == v for name, v in attrs.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        """The single element that matches."""
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"{len(found)} elements match {tag} {attrs}"
        return found[0]

    def inside(self, outer: Element, tag: str, **attrs: str) -> list[Element]:
        """Matching elements that come after ``outer`` and before its next sibling of its tag.

        Enough for our pages, whose articles do not nest.
        """
        start = next(i for i, e in enumerate(self.elements) if e is outer) + 1
        end = next(
            (i for i, e in enumerate(self.elements[start:], start) if e.tag == outer.tag),
            len(self.elements),
        )
        wanted = {id(e) for e in self.find(tag, **attrs)}
        return [e for e in self.elements[start:end] if id(e) in wanted]


def injected(dom: Dom) -> list[str]:
    """What in the DOM did not come from our templates: forbidden elements, handlers, markers."""
    found = [f"<{e.tag}>" for e in dom.elements if e.tag in FORBIDDEN_TAGS]
    found += [
        f"<{e.tag} {name}>" for e in dom.elements for name in e.attrs
        if name.startswith("on") or name == "data-pwned"
    ]
    return found


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header (and that it is one)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# -- the dry run under review ----------------------------------------------------------------------


@dataclass
class Reviewed:
    """The dry run, what it wrote, and what Chromium made of the pages."""

    result: CliResult
    folder: Path
    review: Path
    expected: dict[str, str]  # gmail id -> status the index must show
    senders: dict[str, str]  # gmail id -> sender address
    originals: dict[str, EmailMessage]  # gmail id -> the message as delivered
    hostile_id: str
    deferred_id: str
    gmail_writes: int
    stripe_writes: int
    index: Loaded
    preview: Loaded


@pytest.fixture(scope="module")
def reviewed(
    gmail_server: GmailEmulator, stripe_server: StripeEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Reviewed]:
    """`once --dry-run --review` over the demo inbox plus hostile and failing mail, in Chromium."""
    folder = tmp_path_factory.mktemp("review-run")
    gmail_server.reset()
    stripe_server.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("STRIPE_API_KEY", raising=False)
        patch.delenv("BILLING_RESPONDER_CONFIG", raising=False)
        for module, name in ((gmail, "GMAIL_RETRY"), (billing, "STRIPE_RETRY")):
            policy = getattr(module, name)
            patch.setattr(module, name, replace(policy, initial_wait=0.001, max_wait=0.005))
        sandbox = Sandbox(gmail_server, stripe_server, folder,
                          write_sandbox_config(folder, gmail_server, stripe_server))
        seeded = seed(gmail_server, stripe_server)
        expected = {s.gmail_id: EXPECTED_STATUS[s.expected] for s in seeded
                    if s.expected in EXPECTED_STATUS}
        senders = {s.gmail_id: s.sender for s in seeded}
        stripe_server.add_customer("mallory@example.com", name=HOSTILE_NAME,
                                   subscription_statuses=["active"])
        hostile_id, _ = gmail_server.deliver(
            person_mail("mallory@example.com", HOSTILE_SUBJECT, "Where is it?")
        )
        deferred_id, _ = gmail_server.deliver(
            person_mail("grace@example.net", "Another invoice question", "Hello?")
        )
        gmail_server.inject_fault(
            Fault(503, method="GET", path=f"/messages/{deferred_id}$", times=1000)
        )
        expected |= {hostile_id: "would reply", deferred_id: "deferred"}
        senders |= {hostile_id: "mallory@example.com", deferred_id: "grace@example.net"}
        originals = {gid: gmail_server.message(gid).message for gid in senders}
        review = folder / "review"
        result = sandbox.cli("once", "--dry-run", "--review", str(review))
        gmail_server.clear_faults()
        gmail_writes, stripe_writes = len(gmail_server.writes()), len(stripe_server.writes())
    assert result.code == 0, result.stderr
    work = tmp_path_factory.mktemp("chromium")
    preview = next(review.glob(f"*-{hostile_id}.html"))
    yield Reviewed(
        result, folder, review, expected, senders, originals, hostile_id, deferred_id,
        gmail_writes, stripe_writes,
        index=load_in_chromium(review / "index.html", work),
        preview=load_in_chromium(preview, work),
    )


# -- the files -------------------------------------------------------------------------------------


class TestFiles:
    def test_each_would_be_reply_has_an_eml_and_a_preview_numbered_as_in_the_cycle(
        self, reviewed: Reviewed
    ) -> None:
        """Every would-be reply, and nothing else, gets NNN-<gmail id>.eml and .html."""
        replies = {gid for gid, status in reviewed.expected.items() if status == "would reply"}
        emls = sorted(p.name for p in reviewed.review.glob("*.eml"))
        assert {name[4:-4] for name in emls} == replies
        assert [name[:3] for name in emls] == sorted(name[:3] for name in emls)
        assert all(name[3] == "-" and name[:3].isdigit() for name in emls)
        for name in emls:
            assert (reviewed.review / name.replace(".eml", ".html")).is_file()

    def test_eml_is_the_threaded_reply_to_the_sender_with_the_placeholder_link(
        self, reviewed: Reviewed
    ) -> None:
        """Each .eml parses, goes only to the original sender, threads, and carries the placeholder."""
        for path in reviewed.review.glob("*.eml"):
            gmail_id = path.stem[4:]
            reply = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(reply, EmailMessage)
            original = reviewed.originals[gmail_id]
            assert reply["To"] == reviewed.senders[gmail_id]
            assert reply["Cc"] is None and reply["Bcc"] is None
            assert reply["In-Reply-To"] == original["Message-ID"]
            assert reply["Auto-Submitted"] == "auto-replied"
            for kind in ("plain", "html"):
                part = reply.get_body(preferencelist=(kind,))
                assert isinstance(part, EmailMessage)
                assert DRY_RUN_PORTAL_URL in part.get_content()

    def test_review_folder_and_files_are_private(self, reviewed: Reviewed) -> None:
        """The folder is 0700 and every file 0600: they hold customers' addresses."""
        assert stat.S_IMODE(reviewed.review.stat().st_mode) == 0o700
        for path in reviewed.review.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name

    def test_a_reviewed_dry_run_still_writes_nothing_anywhere(self, reviewed: Reviewed) -> None:
        """No Gmail or Stripe write (no send, label or portal session) and no ledger file."""
        assert reviewed.gmail_writes == 0 and reviewed.stripe_writes == 0
        assert not (reviewed.folder / "state.db").exists()

    def test_once_prints_the_index_path(self, reviewed: Reviewed) -> None:
        """`once` ends by naming the page to open."""
        assert f"review page: {(reviewed.review / 'index.html').absolute()}" in reviewed.result.stdout


# -- the index, as Chromium shows it --------------------------------------------------------------


class TestIndexInChromium:
    def test_counts_at_the_top_match_the_cycle(self, reviewed: Reviewed) -> None:
        """The counts say how many messages would be answered, skipped, escalated, deferred."""
        dom = Dom(reviewed.index.dom)
        shown = {e.attrs["data-status"]: e.text for e in dom.find("li", **{"class": "count"})}
        want: dict[str, int] = {}
        for status in reviewed.expected.values():
            want[status] = want.get(status, 0) + 1
        assert {status: int(text.split()[0]) for status, text in shown.items()} == want
        summary = dom.one(id="summary").text
        assert summary == reviewed.result.stdout.split("dry run: ", 1)[1].splitlines()[0]

    def test_every_message_is_listed_with_its_decision_and_reasons(
        self, reviewed: Reviewed
    ) -> None:
        """Each message of the cycle has an article with its decision, sender and reasons."""
        dom = Dom(reviewed.index.dom)
        articles = {str(e.attrs["data-gmail-id"]): e for e in dom.find("article")}
        assert {gid: a.attrs["data-status"] for gid, a in articles.items()} == reviewed.expected
        stranger = next(a for a in articles.values() if a.attrs["data-status"] == "would escalate")
        assert "no Stripe customer has this sender's address" in stranger.text
        assert "stranger@unknown.test" in stranger.text  # owner-facing: in full
        deferred = articles[reviewed.deferred_id]
        assert "503" in deferred.text
        bounce = next(a for a in articles.values() if "MAILER-DAEMON" in a.text)
        assert "automated: Content-Type multipart/report" in bounce.text

    def test_a_would_be_reply_shows_its_text_and_links_its_files(self, reviewed: Reviewed) -> None:
        """A reply's article shows the reply text (placeholder link included) and links both files."""
        dom = Dom(reviewed.index.dom)
        article = dom.one("article", data_gmail_id=reviewed.hostile_id)
        text = dom.inside(article, "pre", **{"class": "reply-text"})
        assert len(text) == 1 and DRY_RUN_PORTAL_URL in text[0].text
        stem = next(reviewed.review.glob(f"*-{reviewed.hostile_id}.eml")).stem
        links = {e.attrs["href"] for e in dom.inside(article, "a")}
        assert links == {f"{stem}.eml", f"{stem}.html"}

    def test_hostile_subject_and_customer_name_are_shown_as_text(self, reviewed: Reviewed) -> None:
        """The script-bearing subject and the <img> customer name appear verbatim, as text."""
        dom = Dom(reviewed.index.dom)
        article = dom.one("article", data_gmail_id=reviewed.hostile_id)
        assert dom.inside(article, "h2")[0].text == HOSTILE_SUBJECT
        reply_text = dom.inside(article, "pre")[0].text
        assert reply_text.startswith(f"Hello {HOSTILE_NAME},")
        assert f"Re: {HOSTILE_SUBJECT}" in article.text

    def test_nothing_hostile_became_an_element_and_no_script_ran(self, reviewed: Reviewed) -> None:
        """No injected element or handler in the loaded DOM; the payloads' markers were never set."""
        dom = Dom(reviewed.index.dom)
        assert injected(dom) == []
        summary = reviewed.result.stdout.split("dry run: ", 1)[1].splitlines()[0]
        assert dom.one("title").text == f"Dry-run review: {summary}"
        assert "data-pwned" not in dom.one("body").attrs

    def test_page_forbids_scripts_and_remote_content(self, reviewed: Reviewed) -> None:
        """A Content-Security-Policy with default-src 'none' and no script source is in force."""
        dom = Dom(reviewed.index.dom)
        policy = dom.one("meta", http_equiv="Content-Security-Policy").attrs["content"] or ""
        directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
        assert directives["default-src"] == ["'none'"]
        assert "script-src" not in directives and "connect-src" not in directives
        assert directives["img-src"] == ["data:"]

    def test_index_renders(self, reviewed: Reviewed) -> None:
        """Chromium's screenshot of the index is a full-size, non-trivial PNG."""
        assert png_size(reviewed.index.screenshot) == WINDOW
        assert reviewed.index.screenshot.stat().st_size > NON_TRIVIAL_PNG_BYTES


# -- one reply's preview, as Chromium shows it ----------------------------------------------------


class TestPreviewInChromium:
    def test_preview_shows_the_reply_headers(self, reviewed: Reviewed) -> None:
        """From, To and the threaded subject of the reply are shown, hostile text as text."""
        dom = Dom(reviewed.preview.dom)
        headers = {e.attrs["data-header"]: e.text for e in dom.find("dd") if "data-header" in e.attrs}
        assert headers["To"] == "mallory@example.com"
        assert headers["Subject"] == f"Re: {HOSTILE_SUBJECT}"
        assert headers["From"] == "Acme Support <support@acme-saas.test>"
        assert headers["In-Reply-To"] == reviewed.originals[reviewed.hostile_id]["Message-ID"]

    def test_html_part_is_in_a_sandboxed_frame_with_its_markup_escaped(
        self, reviewed: Reviewed
    ) -> None:
        """The HTML part sits in an iframe with an empty sandbox; the name inside it is text."""
        dom = Dom(reviewed.preview.dom)
        frame = dom.one("iframe")
        assert frame.attrs["sandbox"] == ""
        inner = Dom(frame.attrs["srcdoc"] or "")
        assert injected(inner) == []
        assert f"Hello {HOSTILE_NAME}," in " ".join(e.text for e in inner.find("p"))
        assert [a.attrs["href"] for a in inner.find("a")] == [DRY_RUN_PORTAL_URL]

    def test_preview_runs_nothing_and_renders(self, reviewed: Reviewed) -> None:
        """No injected element, no marker set, and a non-trivial screenshot."""
        dom = Dom(reviewed.preview.dom)
        assert injected(dom) == []
        number = int(reviewed.preview.screenshot.stem[:3])
        assert dom.one("title").text == f"Reply #{number}: Re: {HOSTILE_SUBJECT}"
        assert "data-pwned" not in dom.one("body").attrs
        assert png_size(reviewed.preview.screenshot) == WINDOW
        assert reviewed.preview.screenshot.stat().st_size > NON_TRIVIAL_PNG_BYTES


# -- the folder ------------------------------------------------------------------------------------


def reply_mail(sandbox: Sandbox, sender: str) -> str:
    """A customer and their billing mail; the message's Gmail id."""
    sandbox.stripe.add_customer(sender, name="A Customer")
    gmail_id, _ = sandbox.gmail.deliver(person_mail(sender, "Invoice please", "?"))
    return gmail_id


class TestFolder:
    def test_a_non_empty_folder_that_is_no_review_is_refused_before_anything_runs(
        self, sandbox: Sandbox
    ) -> None:
        """Exit 2 with one line; the folder's files untouched; Gmail and Stripe never asked."""
        reply_mail(sandbox, "ada@example.com")
        folder = sandbox.folder / "mine"
        folder.mkdir()
        (folder / "index.html").write_text("my own page")
        result = sandbox.cli("once", "--dry-run", "--review", str(folder))
        assert result.code == 2
        assert result.stderr.count("\n") == 1 and "not empty" in result.stderr
        assert (folder / "index.html").read_text() == "my own page"
        assert sorted(p.name for p in folder.iterdir()) == ["index.html"]
        assert sandbox.gmail.requests == [] and sandbox.stripe.requests == []

    def test_a_file_in_place_of_the_folder_is_refused(self, sandbox: Sandbox) -> None:
        """A path that is a file: exit 2, one line, the file untouched."""
        path = sandbox.folder / "review"
        path.write_text("x")
        result = sandbox.cli("once", "--dry-run", "--review", str(path))
        assert result.code == 2 and "not a folder" in result.stderr
        assert path.read_text() == "x"

    def test_a_new_review_replaces_the_previous_one_and_nothing_else(
        self, sandbox: Sandbox
    ) -> None:
        """Into an earlier review's folder: its files are replaced, the owner's own files kept."""
        ada = reply_mail(sandbox, "ada@example.com")
        grace = reply_mail(sandbox, "grace@example.net")
        folder = sandbox.folder / "review"
        assert sandbox.cli("once", "--dry-run", "--review", str(folder)).code == 0
        assert sorted(p.name for p in folder.glob("*.eml")) == [f"001-{ada}.eml", f"002-{grace}.eml"]
        (folder / "notes.txt").write_text("checked #1")
        # Mail received before the others comes first in the next cycle, and shifts the numbers.
        earlier = int(time.time() * 1000) - 60_000
        sandbox.gmail.deliver(
            person_mail("news@list.test", "Billing tips", "!", extra_headers={"Precedence": "bulk"}),
            internal_date_ms=earlier,
        )
        result = sandbox.cli("once", "--dry-run", "--review", str(folder))
        assert result.code == 0, result.stderr
        assert sorted(p.name for p in folder.glob("*.eml")) == [f"002-{ada}.eml", f"003-{grace}.eml"]
        assert sorted(p.name for p in folder.glob("*.html")) == [
            f"002-{ada}.html", f"003-{grace}.html", "index.html"
        ]
        assert (folder / "notes.txt").read_text() == "checked #1"

    def test_review_without_dry_run_is_refused(self, sandbox: Sandbox) -> None:
        """--review shows replies instead of sending them, so it needs --dry-run: exit 2."""
        reply_mail(sandbox, "ada@example.com")
        result = sandbox.cli("once", "--review", str(sandbox.folder / "review"))
        assert result.code == 2 and "--dry-run" in result.stderr
        assert sandbox.gmail.sent_messages() == []
        assert not (sandbox.folder / "review").exists()

    def test_an_empty_cycle_gives_a_page_that_says_so(self, sandbox: Sandbox) -> None:
        """Nothing waiting: exit 0, an index saying 0 messages and so, and no reply files."""
        folder = sandbox.folder / "review"
        result = sandbox.cli("once", "--dry-run", "--review", str(folder))
        assert result.code == 0, result.stderr
        page = Dom((folder / "index.html").read_text(encoding="utf-8"))
        assert page.one(id="summary").text == "0 messages"
        assert page.one(id="empty").text == "No message in the mailbox is waiting for an answer."
        assert sorted(p.name for p in folder.iterdir()) == [".billing-responder-review", "index.html"]
