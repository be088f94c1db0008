"""`billing-responder check`: the go-live checklist.

One line per check, in the order a deployment depends on them::

    ✓ config                 /etc/billing-responder/config.toml is valid
    ✗ Stripe API             the key was rejected: Invalid API Key provided: rk_live_****abcd — ...
    - portal configuration   not checked: needs the Stripe API
      ! a warning that does not fail the check

Every check runs even after another failed; a check that needs what failed is listed as not
checked instead of failing a second time. The exit code is 0 only when every check passed.

Read-only by design: ``check`` sends, labels, mints and writes nothing in Gmail or Stripe (it
refreshes the Gmail access token, which changes nothing there, and does not write it back), and
it does not create the state database: the first run of the service does, so the file belongs to
the service's user rather than to whoever ran ``check`` (a root-owned 0600 ledger would lock the
service out). Decisions a reader may look for:

* A **live** Stripe key is named prominently; a **test** key is a pass, with a warning when the
  config talks to the real Stripe (no ``[stripe] api_base``): there a test key finds no real
  customers. A live *secret* key (``sk_live_``) is a pass with a warning: a restricted key with
  the three permissions the README lists can do far less if it leaks.
* Labels that do not exist yet pass: the first run creates them.
* Pending ledger migrations pass: the first run applies them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from billing_responder import mail
from billing_responder.billing import StripeBilling, key_kind, key_mode
from billing_responder.config import (
    STRIPE_CREDENTIAL_NAME,
    STRIPE_KEY_ENV_VAR,
    Config,
    stripe_api_key,
)
from billing_responder.errors import (
    BillingResponderError,
    ConfigError,
    FatalServiceError,
    GmailAuthError,
    ServiceUnavailableError,
    StateError,
)
from billing_responder.gmail import (
    SCOPES,
    GmailCredentials,
    GmailMailbox,
    load_credentials,
    refresh_now,
)
from billing_responder.ledger import SqliteLedger
from billing_responder.render import ReplyContext, ReplyRenderer
from billing_responder.service import open_billing

PASS, FAIL, SKIP, NOTE = "✓", "✗", "-", "!"
EXIT_READY, EXIT_NOT_READY = 0, 1
_FIX_AUTH = "run: billing-responder auth"
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# Rendered into the templates to prove that a customer's name cannot inject markup.
_HOSTILE_NAME = "<i>Ada</i> & Co"
_SAMPLE_PORTAL_URL = "https://billing.stripe.com/p/session/test_billing_responder_check"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: passed (True), failed (False) or not checked (None)."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """How the result is printed: its line, then one line per note."""
        mark = {True: PASS, False: FAIL, None: SKIP}[self.ok]
        text = f"{mark} {self.name:<22} {self.detail}"
        if self.fix:
            text += f" — {self.fix}"
        return [text, *(f"  {NOTE} {note}" for note in self.notes)]


def passed(name: str, detail: str, *notes: str) -> CheckResult:
    """A check that passed."""
    return CheckResult(name, True, detail, notes=notes)


def failed(name: str, detail: str, fix: str = "") -> CheckResult:
    """A check that failed, and what to do about it."""
    return CheckResult(name, False, detail, fix)


def not_checked(name: str, needs: str) -> CheckResult:
    """A check skipped because one it depends on failed."""
    return CheckResult(name, None, f"not checked: needs {needs}")


@dataclass
class _Found:
    """What earlier checks established, for the checks that depend on it."""

    #: Closes what the checks opened (connections), once all have run.
    cleanup: contextlib.ExitStack
    api_key: str | None = None
    billing: StripeBilling | None = None
    stripe_ok: bool = False
    credentials: GmailCredentials | None = None
    mailbox: GmailMailbox | None = None
    address: str | None = None


def run_check(config: Config, out: TextIO) -> int:
    """Print one ✓/✗ line per check; 0 when every check passed, else 1."""
    results: list[CheckResult] = []
    with contextlib.ExitStack() as cleanup:
        found = _Found(cleanup)
        for check in CHECKS:
            result = check(config, found)
            results.append(result)
            for line in result.lines():
                print(line, file=out)
            out.flush()
    failures = sum(r.ok is False for r in results)
    skipped = sum(r.ok is None for r in results)
    if failures or skipped:
        also = f", {skipped} not checked" if skipped else ""
        print(f"\nNot ready: {failures} of {len(results)} checks failed{also}.", file=out)
        return EXIT_NOT_READY
    print(f"\nReady to go live: all {len(results)} checks passed.", file=out)
    return EXIT_READY


def _problem(exc: BillingResponderError) -> str:
    """An error's message without the service prefix the check's name already says."""
    if isinstance(exc, ConfigError):
        return exc.problem
    if isinstance(exc, FatalServiceError):
        return str(exc).removeprefix(f"{exc.service}: ")
    return str(exc)


# -- the checks, in order ------------------------------------------------------------------------


def check_config(config: Config, found: _Found) -> CheckResult:
    """The config parsed and validated (else the CLI stopped with exit 2 before any check)."""
    return passed("config", f"{config.path} is valid")


def check_stripe_key(config: Config, found: _Found) -> CheckResult:
    """A Stripe key is found where the config says, and looks like one."""
    name = "Stripe key"
    try:
        key = stripe_api_key(config)
    except ConfigError as exc:
        return failed(name, exc.problem)
    found.api_key = key
    prefix = key[: key.index("_", 3) + 1] if key.count("_") >= 2 else key[:3]
    detail = f"{key_kind(key)} key ({prefix}...) from {_key_source(config)}"
    if key_kind(key) == "secret" and key_mode(key) == "live":
        return passed(
            name,
            detail,
            "a live secret key can do anything in your Stripe account; a restricted key "
            "(rk_live_...) with the three permissions in README (Stripe key) is safer",
        )
    return passed(name, detail)


def _key_source(config: Config) -> str:
    # The order stripe_api_key() looks in, described rather than read again.
    if os.environ.get(STRIPE_KEY_ENV_VAR, "").strip():
        return f"${STRIPE_KEY_ENV_VAR}"
    if config.stripe.api_key_file is not None:
        return f"the file {config.stripe.api_key_file}"
    return f"the systemd credential {STRIPE_CREDENTIAL_NAME}"


def check_stripe_api(config: Config, found: _Found) -> CheckResult:
    """Stripe accepts the key; its mode (test or live) is stated."""
    name = "Stripe API"
    if found.api_key is None:
        return not_checked(name, "a Stripe key")
    billing = open_billing(config, found.api_key)
    found.billing = billing
    found.cleanup.callback(billing.close)
    try:
        billing.verify()
        # Customer lookups expand subscriptions: a restricted key without that permission would
        # fail every one of them.
        billing.verify_subscriptions()
    except FatalServiceError as exc:
        if isinstance(exc, ServiceUnavailableError):
            return failed(name, _problem(exc), "check the network and [stripe] api_base")
        return failed(name, _problem(exc), "check the key (Dashboard → Developers → API keys)")
    found.stripe_ok = True
    can = "reads customers and subscriptions"
    if key_mode(found.api_key) == "live":
        return passed(name, f"key accepted, {can} — LIVE mode: real customers, real portal links")
    notes: tuple[str, ...] = ()
    if not config.stripe.api_base:
        notes = (
            "test mode against the real Stripe: real customers do not exist in test mode, so "
            "nobody would get a link; use a live key to go live",
        )
    return passed(name, f"key accepted, {can} — test mode", *notes)


def check_portal_configuration(config: Config, found: _Found) -> CheckResult:
    """The portal configuration sessions will use exists and is active."""
    name = "portal configuration"
    if found.billing is None or not found.stripe_ok:
        return not_checked(name, "the Stripe API")
    configured = config.stripe.portal_configuration
    dashboard = "Stripe Dashboard → Settings → Billing → Customer portal"
    try:
        portal = found.billing.portal_configuration()
    except BillingResponderError as exc:
        return failed(name, _problem(exc), "see README (Stripe key) for the permissions")
    if portal is None and configured:
        return failed(
            name,
            f"{configured} ([stripe] portal_configuration) does not exist in this account "
            f"({key_mode(found.api_key or '')} mode)",
            "copy the id from the Stripe Dashboard, or remove the key to use the default",
        )
    if portal is None:
        return failed(
            name,
            "the account has no default portal configuration, so Stripe refuses portal sessions",
            f"save the portal settings once in the {dashboard}",
        )
    which = "the default" if portal.is_default else "[stripe] portal_configuration"
    if not portal.active:
        return failed(
            name,
            f"{portal.id} ({which}) is inactive",
            f"activate it in the {dashboard}, or configure an active one",
        )
    return passed(name, f"{portal.id} ({which}) is active")


def check_return_url(config: Config, found: _Found) -> CheckResult:
    """The portal's return link is https (http only for a local test)."""
    name = "return URL"
    url = config.stripe.return_url
    parts = urlsplit(url)
    if parts.scheme == "https":
        return passed(name, url)
    if parts.hostname in _LOCAL_HOSTS:
        return passed(name, url, "plain http is fine for a local test only")
    return failed(
        name,
        f"{url} is not https: customers would leave the portal over an unencrypted link",
        "use an https:// URL in [stripe] return_url",
    )


def check_gmail_authorisation(config: Config, found: _Found) -> CheckResult:
    """The Gmail credentials load, refresh, and grant the scope the responder needs."""
    name = "Gmail authorisation"
    gmail = config.gmail
    if gmail.service_account_file is not None:
        source = f"service account {gmail.service_account_file} as {gmail.delegated_user}"
        fix = "see README (Gmail credentials) for domain-wide delegation"
    else:
        source, fix = str(gmail.token_file), _FIX_AUTH
    (needed,) = SCOPES
    try:
        credentials = load_credentials(gmail)
        granted = refresh_now(credentials)
    except GmailAuthError as exc:
        return failed(name, f"{source}: {_problem(exc)}", fix)
    except BillingResponderError as exc:
        return failed(name, _problem(exc), "check the network and [gmail] token_uri")
    if granted is not None and needed not in granted:
        shown = ", ".join(sorted(granted)) or "none"
        return failed(name, f"{source}: {needed} not granted (granted: {shown})", fix)
    found.credentials = credentials
    return passed(name, f"{source}: refresh works, {needed.rsplit('/', 1)[-1]} granted")


def check_gmail_mailbox(config: Config, found: _Found) -> CheckResult:
    """Gmail answers, as the mailbox the config expects."""
    name = "Gmail mailbox"
    if found.credentials is None:
        return not_checked(name, "Gmail authorisation")
    mailbox = GmailMailbox(config.gmail, found.credentials)
    found.cleanup.callback(mailbox.close)
    try:
        address = mailbox.address()
    except BillingResponderError as exc:
        return failed(name, _problem(exc), "check the network and [gmail] api_endpoint")
    found.mailbox = mailbox
    found.address = address
    expected = config.gmail.delegated_user or (
        config.gmail.user_id if config.gmail.user_id != "me" else ""
    )
    if expected and not mail.same_address(address, expected):
        return failed(
            name,
            f"the credentials are for {address}, the config expects {expected}",
            f"{_FIX_AUTH} (signed in as {expected})",
        )
    return passed(name, f"{address} (replies are sent from this address)")


def check_send_as(config: Config, found: _Found) -> CheckResult:
    """The mailbox's "Send mail as" addresses: mail from any of them is never answered."""
    name = "Gmail send-as"
    if found.mailbox is None:
        return not_checked(name, "the Gmail mailbox")
    try:
        addresses = found.mailbox.send_as_addresses()
    except BillingResponderError as exc:
        return failed(name, _problem(exc), "check the network and [gmail] api_endpoint")
    aliases = [a for a in addresses if not mail.same_address(a, found.address or "")]
    if not aliases:
        return passed(name, "no aliases besides the mailbox's own address")
    return passed(name, f"aliases (never answered): {', '.join(aliases)}")


def check_labels(config: Config, found: _Found) -> CheckResult:
    """The labels exist, or will be created on the first run (``check`` creates nothing)."""
    name = "Gmail labels"
    if found.mailbox is None:
        return not_checked(name, "the Gmail mailbox")
    names = [config.labels.replied, config.labels.needs_human]
    if config.reply.mode == "draft":
        names.append(config.labels.drafted)
    try:
        ids = found.mailbox.label_ids(names, create=False)
    except BillingResponderError as exc:
        return failed(name, _problem(exc), "check the network and [gmail] api_endpoint")
    present = [label for label in names if ids.get(label)]
    absent = [label for label in names if not ids.get(label)]
    parts = [f"present: {', '.join(present)}"] if present else []
    if absent:
        parts.append(f"created on the first run: {', '.join(absent)}")
    return passed(name, "; ".join(parts))


def check_templates(config: Config, found: _Found) -> CheckResult:
    """The reply templates render with sample data, carry the link, and escape HTML."""
    name = "templates"
    folder = config.reply.templates_dir
    where = str(folder) if folder is not None else "built-in templates"
    renderer = ReplyRenderer(folder, config_path=str(config.path))
    try:
        renderer.check()
        rendered = renderer.render(
            ReplyContext(
                customer_name=_HOSTILE_NAME,
                portal_url=_SAMPLE_PORTAL_URL,
                original_subject="Where is my invoice?",
                signature=config.reply.signature,
            )
        )
    except ConfigError as exc:
        return failed(name, exc.problem, "fix the template, then run check again")
    missing = [
        part
        for part, body in (("text", rendered.text), ("HTML", rendered.html))
        if _SAMPLE_PORTAL_URL not in body
    ]
    if missing:
        return failed(
            name,
            f"{where}: the {' and '.join(missing)} part has no portal link",
            "put {{ portal_url }} in reply.txt.j2 and reply.html.j2",
        )
    if _HOSTILE_NAME in rendered.html:
        return failed(
            name,
            f"{where}: a customer's name reaches the HTML unescaped",
            "remove |safe or {% autoescape false %} around customer data",
        )
    return passed(name, f"{where} render with sample data (text and HTML, HTML escaped)")


def check_state_database(config: Config, found: _Found) -> CheckResult:
    """The ledger opens (read-only) with a known schema, its folder is writable, its mode 0600.

    A missing ledger is not created here (see the module docstring).
    """
    name = "state database"
    try:
        return _check_state_database(config.state.database, name)
    except OSError as exc:  # Python 3.11's Path.exists() raises on EACCES
        return _not_permitted(name, exc)


def _not_permitted(name: str, exc: OSError) -> CheckResult:
    where = f"{exc.filename}: " if exc.filename else ""
    return failed(
        name,
        f"cannot look: {where}{exc.strerror or exc}",
        "run `check` as root or as the service's user (under DynamicUser=, as root)",
    )


def _check_state_database(path: Path, name: str) -> CheckResult:
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        return failed(name, f"{folder} is not a folder", "point [state] database elsewhere")
    if not _writable(folder):
        return failed(
            name,
            f"cannot write in {folder}",
            "make it writable by the service's user, or point [state] database elsewhere",
        )
    if not path.exists():
        return passed(name, f"{path} will be created on the first run (its folder is writable)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return failed(
            name,
            f"{path} is open to other users (mode {mode:04o}): it holds customers' addresses",
            f"chmod 600 {path}",
        )
    try:
        ledger = SqliteLedger(path, read_only=True)
        try:
            migrations = ledger.migrations()
        finally:
            ledger.close()
    except (StateError, sqlite3.Error) as exc:
        detail = _problem(exc) if isinstance(exc, StateError) else f"{path}: {exc}"
        return failed(name, f"cannot read it: {detail}", "is it a billing-responder ledger?")
    pending = [migration for migration, applied in migrations if applied is None]
    schema = (
        f"{len(pending)} schema migration(s) pending, applied on the next start"
        if pending
        else "schema current"
    )
    return passed(name, f"{path} opens; {schema}")


def _nearest_existing(folder: Path) -> Path:
    # The ledger creates missing parent folders, so the first one that exists must be writable.
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _writable(folder: Path) -> bool:
    # Try it rather than ask os.access: ACLs, read-only mounts and root all answer truthfully.
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".billing-responder-check-"):
            return True
    except OSError:
        return False


def check_secret_files(config: Config, found: _Found) -> CheckResult:
    """The files holding secrets are readable by their owner only."""
    name = "secret files"
    candidates: list[Path | None] = [
        config.gmail.service_account_file or config.gmail.token_file,
        config.stripe.api_key_file,
    ]
    try:
        files = [p for p in candidates if p is not None and p.is_file()]
        open_files = [(p, stat.S_IMODE(p.stat().st_mode)) for p in files]
    except OSError as exc:
        return _not_permitted(name, exc)
    open_files = [(p, mode) for p, mode in open_files if mode & 0o077]
    if open_files:
        shown = ", ".join(f"{p} (mode {mode:04o})" for p, mode in open_files)
        return failed(
            name,
            f"open to other users: {shown}",
            "chmod 600 " + " ".join(str(p) for p, _ in open_files),
        )
    if not files:
        return passed(name, "none on disk to check")
    return passed(name, f"{', '.join(str(p) for p in files)}: owner only")


CHECKS: tuple[Callable[[Config, _Found], CheckResult], ...] = (
    check_config,
    check_stripe_key,
    check_stripe_api,
    check_portal_configuration,
    check_return_url,
    check_gmail_authorisation,
    check_gmail_mailbox,
    check_send_as,
    check_labels,
    check_templates,
    check_state_database,
    check_secret_files,
)
