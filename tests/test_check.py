"""`billing-responder check`: the go-live checklist, through the real clients and the emulators.

Every test runs the command as a user would and reads its ✓/✗ lines; every run is also held to
the checklist's promise that it changes nothing in Gmail or Stripe (no send, label, draft,
portal session or any other write) and creates no state database.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import stripe
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request
from google.oauth2.credentials import Credentials

from billing_responder import checklist
from billing_responder.ledger import SqliteLedger
from billing_responder.sandbox._http import Fault
from billing_responder.sandbox.stripe import StripeEmulator
from tests.conftest import CliResult, Sandbox, as_nobody, needs_root, private_ledger_config

MODIFY = "https://www.googleapis.com/auth/gmail.modify"
READONLY = "https://www.googleapis.com/auth/gmail.readonly"
CHECK_NAMES = (
    "config",
    "Stripe key",
    "Stripe API",
    "portal configuration",
    "return URL",
    "Gmail authorisation",
    "Gmail mailbox",
    "Gmail send-as",
    "Gmail labels",
    "templates",
    "state database",
    "secret files",
)
LIVE_SECRET_KEY = "sk_live_checkchecklive0001"
LIVE_RESTRICTED_KEY = "rk_live_checkchecklive0002"
#: Lacks "Subscriptions: Read", which every customer lookup needs.
NO_SUBSCRIPTIONS_KEY = "rk_live_checkchecklive0003"


def run_check(sandbox: Sandbox) -> CliResult:
    """`check`, asserting what must hold whatever it finds: nothing written anywhere."""
    gmail_before, stripe_before = len(sandbox.gmail.writes()), len(sandbox.stripe.writes())
    database_existed = (sandbox.folder / "state.db").exists()
    result = sandbox.cli("check")
    assert sandbox.gmail.writes()[gmail_before:] == []
    assert sandbox.stripe.writes()[stripe_before:] == []
    assert (sandbox.folder / "state.db").exists() == database_existed
    return result


def lines(result: CliResult) -> dict[str, str]:
    """Each check's line by the check's name: mark, then detail (and the fix)."""
    found = {}
    for line in result.stdout.splitlines():
        if line[:1] in ("✓", "✗", "-") and len(line) > 2:
            found[line[2:24].strip()] = line[0] + " " + line[25:]
    return found


def edit_config(sandbox: Sandbox, section: str, setting: str) -> None:
    """Add ``setting`` to an existing ``[section]`` of the sandbox config."""
    text = sandbox.config_path.read_text(encoding="utf-8")
    assert f"[{section}]\n" in text
    sandbox.config_path.write_text(
        text.replace(f"[{section}]\n", f"[{section}]\n{setting}\n", 1), encoding="utf-8"
    )


def replace_in_config(sandbox: Sandbox, old: str, new: str) -> None:
    """Replace a setting the sandbox config already has."""
    text = sandbox.config_path.read_text(encoding="utf-8")
    assert old in text
    sandbox.config_path.write_text(text.replace(old, new), encoding="utf-8")


def assert_only_failure(result: CliResult, name: str, *also_not_checked: str) -> str:
    """Exit 1, ``name`` the one ✗, the named ones not checked, every other check ✓."""
    found = lines(result)
    assert result.code == 1, result.stdout + result.stderr
    assert set(found) == set(CHECK_NAMES)
    for check, line in found.items():
        expected = "✗" if check == name else "-" if check in also_not_checked else "✓"
        assert line[0] == expected, f"{check}: {line}"
    return found[name]


class TestReadyDeployment:
    def test_fresh_sandbox_passes_every_check_and_exits_0(self, sandbox: Sandbox) -> None:
        """Against a fresh sandbox every check is ✓, the summary says ready, the exit code is 0."""
        result = run_check(sandbox)

        assert result.code == 0, result.stdout + result.stderr
        found = lines(result)
        assert list(found) == list(CHECK_NAMES)
        assert all(line.startswith("✓") for line in found.values()), result.stdout
        assert "Ready to go live: all 12 checks passed." in result.stdout
        assert result.stderr == ""

    def test_mode_mailbox_and_default_portal_configuration_are_named(
        self, sandbox: Sandbox
    ) -> None:
        """The lines say which key (kind, prefix, source), mode, mailbox and portal it found."""
        found = lines(run_check(sandbox))

        assert "secret key (sk_test_...)" in found["Stripe key"]
        assert str(sandbox.folder / "stripe.key") in found["Stripe key"]
        assert "test mode" in found["Stripe API"]
        assert sandbox.gmail.address in found["Gmail mailbox"]
        assert sandbox.stripe.default_configuration_id in found["portal configuration"]
        assert "gmail.modify granted" in found["Gmail authorisation"]

    def test_missing_labels_are_not_created_but_announced(self, sandbox: Sandbox) -> None:
        """Labels that do not exist yet pass as 'created on the first run' and are not created."""
        result = run_check(sandbox)

        assert "created on the first run: billing-responder/replied" in lines(result)[
            "Gmail labels"
        ]
        with pytest.raises(KeyError):
            sandbox.gmail.label_id("billing-responder/replied")

    def test_existing_labels_are_reported_present(self, sandbox: Sandbox) -> None:
        """Labels already in the mailbox are reported present."""
        sandbox.gmail.create_label("billing-responder/replied")
        sandbox.gmail.create_label("billing-responder/needs-human")

        line = lines(run_check(sandbox))["Gmail labels"]

        assert line.startswith("✓")
        assert "present: billing-responder/replied, billing-responder/needs-human" in line
        assert "first run" not in line

    def test_draft_mode_also_needs_the_drafted_label(self, sandbox: Sandbox) -> None:
        """With [reply] mode = "draft" the drafted label is checked too."""
        edit_config(sandbox, "reply", 'mode = "draft"')

        line = lines(run_check(sandbox))["Gmail labels"]

        assert "billing-responder/drafted" in line

    def test_send_as_aliases_are_listed(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The mailbox's "Send mail as" aliases are listed (mail from them is never answered)."""
        monkeypatch.setattr(sandbox.gmail, "send_as_aliases", ["billing@acme-saas.test"])

        line = lines(run_check(sandbox))["Gmail send-as"]

        assert line.startswith("✓")
        assert "billing@acme-saas.test" in line

    def test_existing_ledger_opens_read_only_with_its_schema_current(
        self, sandbox: Sandbox
    ) -> None:
        """An existing ledger is opened and its migrations reported current; nothing changes."""
        database = sandbox.folder / "state.db"
        SqliteLedger(database).close()
        before = database.read_bytes()

        result = run_check(sandbox)

        assert result.code == 0, result.stdout
        assert "opens; schema current" in lines(result)["state database"]
        assert database.read_bytes() == before


class TestStripe:
    def test_rejected_key_fails_stripe_api_and_skips_the_portal(self, sandbox: Sandbox) -> None:
        """A key Stripe refuses is ✗ on 'Stripe API' and the portal check is not run."""
        wrong = "sk_test_wrongwrongwrong0000"
        (sandbox.folder / "stripe.key").write_text(wrong, encoding="utf-8")

        result = run_check(sandbox)

        line = assert_only_failure(result, "Stripe API", "portal configuration")
        assert "rejected" in line and "Invalid API Key" in line
        assert "API keys" in line  # where to fix it
        assert wrong not in result.stdout + result.stderr
        assert "not checked: needs the Stripe API" in lines(result)["portal configuration"]

    def test_missing_key_file_fails_the_key_check(self, sandbox: Sandbox) -> None:
        """No key where the config says: ✗ on 'Stripe key', and Stripe is not asked at all."""
        (sandbox.folder / "stripe.key").unlink()

        result = run_check(sandbox)

        line = assert_only_failure(result, "Stripe key", "Stripe API", "portal configuration")
        assert "stripe.key" in line
        assert sandbox.stripe.requests == []

    def test_key_from_the_environment_names_its_source(
        self, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A key in $STRIPE_API_KEY is used before the key file, and the line says so."""
        monkeypatch.setenv("STRIPE_API_KEY", "sk_test_sandbox")

        assert "from $STRIPE_API_KEY" in lines(run_check(sandbox))["Stripe key"]

    @pytest.mark.usefixtures("fast_retries")
    def test_stripe_down_fails_stripe_api_with_the_network_fix(self, sandbox: Sandbox) -> None:
        """Stripe answering 503 after every retry: ✗ on 'Stripe API', pointing at the network."""
        sandbox.stripe.inject_fault(Fault(503, path="^/v1/", times=1000))

        line = assert_only_failure(run_check(sandbox), "Stripe API", "portal configuration")

        assert "503" in line and "check the network and [stripe] api_base" in line

    def test_inactive_default_portal_configuration_fails(self, sandbox: Sandbox) -> None:
        """The default portal configuration deactivated: ✗ on 'portal configuration'."""
        default = sandbox.stripe.default_configuration_id
        sandbox.stripe.set_configuration_active(default, False)

        line = assert_only_failure(run_check(sandbox), "portal configuration")

        assert default in line and "inactive" in line

    def test_configured_portal_configuration_that_does_not_exist_fails(
        self, sandbox: Sandbox
    ) -> None:
        """A [stripe] portal_configuration Stripe does not know: ✗ naming it."""
        edit_config(sandbox, "stripe", 'portal_configuration = "bpc_1NoSuchConfig00"')

        line = assert_only_failure(run_check(sandbox), "portal configuration")

        assert "bpc_1NoSuchConfig00" in line and "does not exist" in line

    def test_configured_active_portal_configuration_passes(self, sandbox: Sandbox) -> None:
        """A configured, active, non-default portal configuration is the one checked."""
        configured = sandbox.stripe.add_configuration()
        edit_config(sandbox, "stripe", f'portal_configuration = "{configured}"')

        result = run_check(sandbox)

        assert result.code == 0, result.stdout
        line = lines(result)["portal configuration"]
        assert configured in line and "[stripe] portal_configuration" in line

    def test_configured_inactive_portal_configuration_fails(self, sandbox: Sandbox) -> None:
        """A configured portal configuration that is inactive fails, even with an active default."""
        configured = sandbox.stripe.add_configuration(active=False)
        edit_config(sandbox, "stripe", f'portal_configuration = "{configured}"')

        line = assert_only_failure(run_check(sandbox), "portal configuration")

        assert configured in line and "inactive" in line

    def test_plain_http_return_url_fails(self, sandbox: Sandbox) -> None:
        """A return URL over plain http to a real host is ✗ with the fix."""
        replace_in_config(
            sandbox, "https://acme-saas.test/account", "http://acme-saas.test/account"
        )

        line = assert_only_failure(run_check(sandbox), "return URL")

        assert "https://" in line

    def test_plain_http_return_url_to_localhost_passes_with_a_warning(
        self, sandbox: Sandbox
    ) -> None:
        """http://localhost is fine for a local test: ✓ with a warning note."""
        replace_in_config(
            sandbox, "https://acme-saas.test/account", "http://localhost:8000/account"
        )

        result = run_check(sandbox)

        assert result.code == 0, result.stdout
        assert "  ! plain http is fine for a local test only" in result.stdout


@pytest.fixture
def live_stripe() -> Iterator[StripeEmulator]:
    """A Stripe emulator that knows only live keys: a full one and restricted ones."""
    restricted = {
        LIVE_RESTRICTED_KEY: {
            "rak_customer_read", "rak_subscription_read", "rak_billing_portal_write"
        },
        NO_SUBSCRIPTIONS_KEY: {"rak_customer_read", "rak_billing_portal_write"},
    }
    with StripeEmulator(api_keys={LIVE_SECRET_KEY}, restricted_keys=restricted) as server:
        yield server


class TestLiveKeys:
    @staticmethod
    def use(sandbox: Sandbox, live: StripeEmulator, key: str) -> None:
        replace_in_config(sandbox, sandbox.stripe.url, live.url)
        (sandbox.folder / "stripe.key").write_text(key, encoding="utf-8")

    def test_live_restricted_key_says_live_prominently(
        self, sandbox: Sandbox, live_stripe: StripeEmulator
    ) -> None:
        """A live restricted key passes and the line says LIVE: real customers, real links."""
        self.use(sandbox, live_stripe, LIVE_RESTRICTED_KEY)

        result = run_check(sandbox)

        assert result.code == 0, result.stdout
        found = lines(result)
        assert "restricted key (rk_live_...)" in found["Stripe key"]
        assert "LIVE mode" in found["Stripe API"]
        assert "  ! " not in result.stdout  # no warning for a restricted key
        assert LIVE_RESTRICTED_KEY not in result.stdout
        assert live_stripe.writes() == []

    def test_restricted_key_without_subscription_read_fails(
        self, sandbox: Sandbox, live_stripe: StripeEmulator
    ) -> None:
        """A restricted key that cannot read subscriptions (lookups need it): ✗ on 'Stripe API'."""
        self.use(sandbox, live_stripe, NO_SUBSCRIPTIONS_KEY)

        result = run_check(sandbox)

        line = assert_only_failure(result, "Stripe API", "portal configuration")
        assert "lacks a permission" in line and "rak_subscription_read" in line
        assert NO_SUBSCRIPTIONS_KEY not in result.stdout
        assert live_stripe.writes() == []

    def test_live_secret_key_passes_with_a_warning_to_restrict_it(
        self, sandbox: Sandbox, live_stripe: StripeEmulator
    ) -> None:
        """A live full secret key passes, with a note recommending a restricted key."""
        self.use(sandbox, live_stripe, LIVE_SECRET_KEY)

        result = run_check(sandbox)

        assert result.code == 0, result.stdout
        assert re.search(r"^  ! a live secret key .* restricted key", result.stdout, re.M)
        assert LIVE_SECRET_KEY not in result.stdout
        assert live_stripe.writes() == []


class TestGmail:
    def test_revoked_token_fails_authorisation_and_skips_the_mailbox_checks(
        self, sandbox: Sandbox
    ) -> None:
        """A revoked refresh token: ✗ naming `billing-responder auth`; mailbox checks skipped."""
        sandbox.gmail.revoke()

        result = run_check(sandbox)

        line = assert_only_failure(
            result, "Gmail authorisation", "Gmail mailbox", "Gmail send-as", "Gmail labels"
        )
        assert "invalid_grant" in line
        assert "run: billing-responder auth" in line
        assert "not checked: needs Gmail authorisation" in lines(result)["Gmail mailbox"]

    def test_token_without_the_modify_scope_fails_with_the_fix(self, sandbox: Sandbox) -> None:
        """A token granted only gmail.readonly: ✗ saying gmail.modify is missing, and the fix."""
        sandbox.gmail.granted_scope = READONLY

        line = assert_only_failure(
            run_check(sandbox),
            "Gmail authorisation",
            "Gmail mailbox",
            "Gmail send-as",
            "Gmail labels",
        )

        assert "gmail.modify" in line
        assert "run: billing-responder auth" in line

    def test_missing_token_file_fails_authorisation(self, sandbox: Sandbox) -> None:
        """No token file: ✗ with the fix, and Gmail is not contacted."""
        (sandbox.folder / "token.json").unlink()

        result = run_check(sandbox)

        line = assert_only_failure(
            result, "Gmail authorisation", "Gmail mailbox", "Gmail send-as", "Gmail labels"
        )
        assert "no token file" in line and "billing-responder auth" in line
        assert sandbox.gmail.requests == []

    def test_mailbox_other_than_the_authorised_one_fails(self, sandbox: Sandbox) -> None:
        """[gmail] user_id naming another mailbox than the token's: ✗ on 'Gmail mailbox'."""
        edit_config(sandbox, "gmail", 'user_id = "someone-else@acme-saas.test"')

        line = assert_only_failure(
            run_check(sandbox), "Gmail mailbox", "Gmail send-as", "Gmail labels"
        )

        assert "someone-else@acme-saas.test" in line or "Delegation denied" in line

    def test_check_does_not_write_the_refreshed_token_back(self, sandbox: Sandbox) -> None:
        """The token file is left as it was, although check refreshed the access token."""
        token = sandbox.folder / "token.json"
        before = token.read_bytes()

        run_check(sandbox)

        assert token.read_bytes() == before


class TestServiceAccount:
    @staticmethod
    def use_service_account(
        sandbox: Sandbox, delegated_scopes: tuple[str, ...] = (MODIFY,)
    ) -> Path:
        key_file = sandbox.folder / "service-account.json"
        sandbox.gmail.oauth.write_service_account_file(
            key_file, delegated_scopes=delegated_scopes
        )
        edit_config(
            sandbox,
            "gmail",
            f'service_account_file = "{key_file.name}"\n'
            f'delegated_user = "{sandbox.gmail.address}"',
        )
        return key_file

    def test_delegated_service_account_passes_and_its_key_file_is_checked(
        self, sandbox: Sandbox
    ) -> None:
        """A service account with domain-wide delegation passes; its key file is the secret."""
        key_file = self.use_service_account(sandbox)

        result = run_check(sandbox)

        assert result.code == 0, result.stdout
        found = lines(result)
        assert f"service account {key_file} as {sandbox.gmail.address}" in found[
            "Gmail authorisation"
        ]
        assert str(key_file) in found["secret files"]

    def test_undelegated_service_account_fails_with_the_admin_console_fix(
        self, sandbox: Sandbox
    ) -> None:
        """No delegation for gmail.modify: ✗ naming the Admin console, not `auth`."""
        self.use_service_account(sandbox, delegated_scopes=())

        line = assert_only_failure(
            run_check(sandbox),
            "Gmail authorisation",
            "Gmail mailbox",
            "Gmail send-as",
            "Gmail labels",
        )

        assert "unauthorized_client" in line and "Admin console" in line
        assert "billing-responder auth" not in line


class TestTemplates:
    @staticmethod
    def use_templates(sandbox: Sandbox, text: str, html: str) -> None:
        folder = sandbox.folder / "templates"
        folder.mkdir()
        (folder / "reply.txt.j2").write_text(text, encoding="utf-8")
        (folder / "reply.html.j2").write_text(html, encoding="utf-8")
        edit_config(sandbox, "reply", 'templates_dir = "templates"')

    def test_broken_template_fails(self, sandbox: Sandbox) -> None:
        """A template using an undefined variable: ✗ on 'templates' with the reason."""
        self.use_templates(sandbox, "{{ portal_url }} {{ no_such_thing }}", "{{ portal_url }}")

        line = assert_only_failure(run_check(sandbox), "templates")

        assert "no_such_thing" in line

    def test_template_without_the_portal_link_fails(self, sandbox: Sandbox) -> None:
        """A template that forgets {{ portal_url }} would send customers no link: ✗."""
        self.use_templates(sandbox, "Hello {{ customer_name }}", "<p>{{ portal_url }}</p>")

        line = assert_only_failure(run_check(sandbox), "templates")

        assert "text part has no portal link" in line

    def test_template_that_turns_escaping_off_fails(self, sandbox: Sandbox) -> None:
        """An HTML template printing the customer's name with |safe: ✗, markup could be injected."""
        self.use_templates(
            sandbox,
            "{{ customer_name }} {{ portal_url }}",
            "<p>{{ customer_name|safe }}</p><a href='{{ portal_url }}'>portal</a>",
        )

        line = assert_only_failure(run_check(sandbox), "templates")

        assert "unescaped" in line


class TestStateAndSecrets:
    def test_database_folder_that_cannot_be_written_fails(self, sandbox: Sandbox) -> None:
        """A database in a folder nobody may create files in (/proc, even for root): ✗."""
        replace_in_config(
            sandbox, 'database = "state.db"', 'database = "/proc/billing-responder-check/state.db"'
        )

        line = assert_only_failure(run_check(sandbox), "state database")

        assert "cannot write in /proc" in line

    @needs_root
    def test_a_database_folder_this_user_cannot_enter_fails_saying_who_may(
        self, sandbox: Sandbox
    ) -> None:
        """Run as a user who cannot enter the ledger's folder: the state database line is ✗ naming the folder and saying to run `check` as root or the service's user; every check still prints, no traceback."""
        config = private_ledger_config(sandbox)
        private = config.state.database.parent
        out = io.StringIO()
        with as_nobody():
            code = checklist.run_check(config, out)
        assert code == 1
        found = lines(CliResult(code, out.getvalue(), ""))
        assert list(found) == list(CHECK_NAMES)
        line = found["state database"]
        assert line.startswith("✗") and str(private) in line
        assert "as root or as the service's user" in line

    def test_database_under_a_file_fails(self, sandbox: Sandbox) -> None:
        """A database path whose folder is a file: ✗ saying it is not a folder."""
        (sandbox.folder / "blocker").write_text("", encoding="utf-8")
        replace_in_config(sandbox, 'database = "state.db"', 'database = "blocker/state.db"')

        line = assert_only_failure(run_check(sandbox), "state database")

        assert "is not a folder" in line

    def test_database_open_to_others_fails(self, sandbox: Sandbox) -> None:
        """An existing ledger with mode 0644 is flagged with the chmod that fixes it."""
        database = sandbox.folder / "state.db"
        SqliteLedger(database).close()
        database.chmod(0o644)

        line = assert_only_failure(run_check(sandbox), "state database")

        assert "0644" in line and f"chmod 600 {database}" in line

    def test_database_that_is_not_a_ledger_fails(self, sandbox: Sandbox) -> None:
        """A file at the database path that SQLite cannot read: ✗, not a traceback."""
        database = sandbox.folder / "state.db"
        database.write_bytes(b"this is not an SQLite database, just text" * 100)
        database.chmod(0o600)

        result = run_check(sandbox)

        line = assert_only_failure(result, "state database")
        assert "cannot read it" in line
        assert "Traceback" not in result.stderr

    def test_token_file_open_to_others_is_flagged(self, sandbox: Sandbox) -> None:
        """A token file with mode 0644: ✗ on 'secret files' with the chmod that fixes it."""
        token = sandbox.folder / "token.json"
        token.chmod(0o644)

        line = assert_only_failure(run_check(sandbox), "secret files")

        assert f"{token} (mode 0644)" in line and f"chmod 600 {token}" in line


class TestEmulatorsAsCheckSeesThem:
    def test_stripe_answers_an_unknown_portal_configuration_with_its_404(
        self, stripe_server: StripeEmulator
    ) -> None:
        """Retrieving an unknown configuration gets Stripe's 404 resource_missing error."""
        stripe_server.reset()
        client = stripe.StripeClient(
            "sk_test_sandbox", base_addresses={"api": stripe_server.url}, max_network_retries=0
        )

        with pytest.raises(stripe.InvalidRequestError) as raised:
            client.v1.billing_portal.configurations.retrieve("bpc_1Unknown0000")

        assert raised.value.http_status == 404
        assert raised.value.code == "resource_missing"
        assert raised.value.user_message == (
            "No such billing_portal.configuration: 'bpc_1Unknown0000'"
        )
        found = client.v1.billing_portal.configurations.retrieve(
            stripe_server.default_configuration_id
        )
        assert found.active is True and found.is_default is True

    def test_gmail_refuses_a_refresh_asking_for_more_than_was_granted(
        self, sandbox: Sandbox
    ) -> None:
        """As Google does: a refresh asking for a scope the grant lacks gets invalid_scope."""
        sandbox.gmail.granted_scope = READONLY

        def refreshed(scopes: list[str]) -> Credentials:
            credentials = Credentials(  # type: ignore[no-untyped-call]
                None,
                refresh_token=sandbox.gmail.refresh_token,
                client_id="test",
                client_secret="test",
                token_uri=f"{sandbox.gmail.url}/token",
                scopes=scopes,
            )
            with requests.Session() as session:
                credentials.refresh(Request(session))  # type: ignore[no-untyped-call]
            return credentials

        with pytest.raises(RefreshError, match="invalid_scope"):
            refreshed([MODIFY])
        assert refreshed([READONLY]).granted_scopes == [READONLY]
