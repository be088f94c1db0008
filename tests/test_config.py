"""config.toml parsing: the documented keys, defaults, and errors that name file and key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from billing_responder.cli import main
from billing_responder.config import load_config, resolve_config_path, stripe_api_key
from billing_responder.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
[gmail]
token_file = "token.json"
token_uri = ""
api_endpoint = ""
user_id = "me"
[stripe]
api_base = ""
return_url = "https://example.com/account"
[triage]
keywords = ["invoice", "billing"]
[labels]
replied = "billing-responder/replied"
[state]
database = "state.db"
[schedule]
interval_seconds = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


class TestValidFiles:
    def test_issue_minimal_file_is_valid_with_defaults(self, tmp_path: Path) -> None:
        """The key set the issue documents loads, and every other key gets its default."""
        config = load_config(write(tmp_path, MINIMAL))
        assert config.triage.keywords == ("invoice", "billing")
        assert config.labels.needs_human == "billing-responder/needs-human"
        assert config.schedule.interval_seconds == 5.0
        assert config.reply.mark_read is False

    def test_relative_paths_resolve_against_the_config_folder(self, tmp_path: Path) -> None:
        """token_file and database are relative to the config file, not the working directory."""
        config = load_config(write(tmp_path, MINIMAL))
        assert config.gmail.token_file == tmp_path.resolve() / "token.json"
        assert config.state.database == tmp_path.resolve() / "state.db"

    def test_only_return_url_is_required(self, tmp_path: Path) -> None:
        """A file with just [stripe] return_url is a complete configuration."""
        config = load_config(write(tmp_path, '[stripe]\nreturn_url = "https://x.test/a"\n'))
        assert config.gmail.user_id == "me"
        assert config.state.database == tmp_path.resolve() / "state.db"

    def test_the_shipped_example_config_is_valid(self) -> None:
        """config.toml in the repository, which documents every key, loads without error."""
        config = load_config(REPO / "config.toml")
        assert config.stripe.return_url == "https://example.com/account"
        assert config.reply.templates_dir is None

    def test_config_path_prefers_option_then_environment(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """--config wins over $BILLING_RESPONDER_CONFIG, which wins over ./config.toml."""
        monkeypatch.setenv("BILLING_RESPONDER_CONFIG", "/etc/b/config.toml")
        assert resolve_config_path("mine.toml") == Path("mine.toml")
        assert resolve_config_path(None) == Path("/etc/b/config.toml")
        monkeypatch.delenv("BILLING_RESPONDER_CONFIG")
        assert resolve_config_path(None) == Path("config.toml")


class TestErrorsNameFileAndKey:
    @pytest.mark.parametrize(
        ("text", "key", "words"),
        [
            ('[stripe]\nreturn_url = "https://x.test"\n[gmail]\ntoken_fil = "t.json"\n',
             "gmail.token_fil", "unknown key"),
            ('[stripe]\nreturn_url = "https://x.test"\n[gmial]\n', "gmial", "unknown section"),
            ('[stripe]\nreturn_url = "https://x.test"\n[schedule]\ninterval_seconds = "5"\n',
             "schedule.interval_seconds", "must be a number"),
            ('[stripe]\nreturn_url = "https://x.test"\n[triage]\nkeywords = "invoice"\n',
             "triage.keywords", "list of strings"),
            ('[stripe]\nreturn_url = "https://x.test"\n[triage]\nkeywords = []\n',
             "triage.keywords", "non-empty"),
            ('[stripe]\nreturn_url = "https://x.test"\n[reply]\nmark_read = "yes"\n',
             "reply.mark_read", "true or false"),
            ('[stripe]\nreturn_url = "not a url"\n', "stripe.return_url", "not an http(s) URL"),
            ("[gmail]\n", "stripe.return_url", "required"),
            ('[stripe]\nreturn_url = "https://x.test"\napi_key = "sk_test_1"\n',
             "stripe.api_key", "do not belong"),
            ('[stripe]\nreturn_url = "https://x.test"\n[labels]\nreplied = "a"\nneeds_human = "a"\n',
             "labels.needs_human", "must differ"),
            ('[stripe]\nreturn_url = "https://x.test"\n[schedule]\ninterval_seconds = 0\n',
             "schedule.interval_seconds", "at least 1"),
            ('[stripe]\nreturn_url = "https://x.test"\n[reply]\ntemplates_dir = "nope"\n',
             "reply.templates_dir", "not a folder"),
            ('[stripe]\nreturn_url = "https://x.test"\n[schedule]\ninterval_seconds = inf\n',
             "schedule.interval_seconds", "finite"),
            ('[stripe]\nreturn_url = "https://x.test"\n[labels]\nreplied = "done (auto)"\n',
             "labels.replied", "not a usable label name"),
            ('[stripe]\nreturn_url = "https://x.test"\n[limits]\nmax_attempts = 0\n',
             "limits.max_attempts", "greater than 0"),
            ('[stripe]\nreturn_url = "https://x.test"\n[limits]\nper_sender_hours = -1\n',
             "limits.per_sender_hours", "greater than 0"),
            ('[stripe]\nreturn_url = "https://x.test"\n[triage]\nmax_age_days = 0\n',
             "triage.max_age_days", "greater than 0"),
            ('[stripe]\nreturn_url = "https://x.test"\n[logging]\nmask_addresses = "no"\n',
             "logging.mask_addresses", "true or false"),
            ('[stripe]\nreturn_url = "https://x.test"\n[logging]\nmask_addresses = 0\n',
             "logging.mask_addresses", "true or false"),
            ('[stripe]\nreturn_url = "https://x.test"\n[logging]\nformat = "xml"\n',
             "logging.format", "must be one of 'text', 'json'"),
            ('[stripe]\nreturn_url = "https://x.test"\n[reply]\nmode = "Draft"\n',
             "reply.mode", "must be one of 'send', 'draft'"),
            ('[stripe]\nreturn_url = "https://x.test"\n[labels]\ndrafted = "Billing-Responder/Replied"\n',
             "labels.drafted", "must differ from labels.replied"),
            ('[stripe]\nreturn_url = "https://x.test"\n[gmail]\nservice_account_file = "sa.json"\n',
             "gmail.delegated_user", "go together"),
            ('[stripe]\nreturn_url = "https://x.test"\n[gmail]\ndelegated_user = "a@b.example"\n',
             "gmail.service_account_file", "go together"),
            ('[stripe]\nreturn_url = "https://x.test"\n[gmail]\nservice_account_file = "sa.json"\n'
             'delegated_user = "support"\n', "gmail.delegated_user", "email address"),
            ('[stripe]\nreturn_url = "https://x.test"\n[notify]\nemail = "ops, dev@x.example"\n',
             "notify.email", "one email address"),
            ('[stripe]\nreturn_url = "https://x.test"\n[notify]\ncommand = "page-me --now"\n',
             "notify.command", "list of strings"),
            ('[stripe]\nreturn_url = "https://x.test"\n[notify]\ncommand = [""]\n',
             "notify.command", "program to run"),
            ('[stripe]\nreturn_url = "https://x.test"\n[metrics]\nlisten = "9464"\n',
             "metrics.listen", "host:port"),
            ('[stripe]\nreturn_url = "https://x.test"\n[metrics]\nlisten = "localhost:99999"\n',
             "metrics.listen", "host:port"),
        ],
    )
    def test_bad_value_names_file_key_and_problem(
        self, tmp_path: Path, text: str, key: str, words: str
    ) -> None:
        """Every kind of mistake is a ConfigError naming the file, the dotted key and the problem."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.key == key
        assert str(path) in str(caught.value)
        assert words in caught.value.problem

    def test_missing_file_says_how_to_point_at_one(self, tmp_path: Path) -> None:
        """A missing config file is an error that mentions --config."""
        with pytest.raises(ConfigError, match="--config"):
            load_config(tmp_path / "absent.toml")

    def test_invalid_toml_is_a_config_error(self, tmp_path: Path) -> None:
        """A TOML syntax error is reported as such, with the file name."""
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(write(tmp_path, "[stripe\n"))


class TestLoggingSection:
    def test_mask_addresses_is_on_unless_turned_off(self, tmp_path: Path) -> None:
        """[logging] mask_addresses defaults to true; false is taken as written."""
        assert load_config(write(tmp_path, MINIMAL)).logging.mask_addresses is True
        text = MINIMAL + "[logging]\nmask_addresses = false\n"
        assert load_config(write(tmp_path, text)).logging.mask_addresses is False

    def test_a_wrong_mask_addresses_type_exits_2_naming_file_and_key(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`once` with mask_addresses = "yes" exits 2 with one line naming the file and the key."""
        path = write(tmp_path, MINIMAL + '[logging]\nmask_addresses = "yes"\n')
        assert main(["--config", str(path), "once"]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "logging.mask_addresses" in err
        assert len(err.strip().splitlines()) == 1


class TestStripeKey:
    @pytest.mark.parametrize("key", ["api_key", "secret_key"])
    def test_a_key_in_the_config_file_is_refused_without_echoing_it(
        self, tmp_path: Path, key: str
    ) -> None:
        """[stripe] api_key is an error that says where the key goes instead, and not the key."""
        secret = "sk_live_DoNotEchoMe1234567890"
        path = write(tmp_path, f'[stripe]\nreturn_url = "https://x.test"\n{key} = "{secret}"\n')
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.key == f"stripe.{key}"
        assert "STRIPE_API_KEY" in str(caught.value) and "api_key_file" in str(caught.value)
        assert secret not in str(caught.value)

    @pytest.mark.parametrize(
        ("section", "key"),
        [("stripe", "api_key_file"), ("stripe", "portal_configuration"), ("reply", "signature"),
         ("stripe", "api_kee")],
    )
    def test_a_key_pasted_into_any_value_is_refused_without_echoing_it(
        self, tmp_path: Path, section: str, key: str
    ) -> None:
        """A value that looks like a Stripe key is refused wherever it is, naming only the key."""
        secret = "rk_live_DoNotEchoMe1234567890"
        header = "" if section == "stripe" else f"[{section}]\n"
        text = f'[stripe]\nreturn_url = "https://x.test"\n{header}{key} = "{secret}"\n'
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.key == f"{section}.{key}"
        assert "STRIPE_API_KEY" in str(caught.value)
        assert secret not in str(caught.value)

    def test_a_key_in_the_config_file_makes_once_exit_2_without_printing_it(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The command refuses to start: exit 2, one line, the key nowhere in the output."""
        secret = "sk_test_DoNotEchoMe1234567890"
        path = write(tmp_path, MINIMAL.replace("[stripe]\n", f'[stripe]\napi_key = "{secret}"\n'))
        assert main(["--config", str(path), "once"]) == 2
        out, err = capsys.readouterr()
        assert "stripe.api_key" in err and "STRIPE_API_KEY" in err
        assert secret not in out + err

    def test_environment_variable_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """STRIPE_API_KEY is used when set, before any key file."""
        (tmp_path / "k").write_text("rk_test_file\n")
        config = load_config(write(tmp_path, MINIMAL))
        monkeypatch.setenv("STRIPE_API_KEY", "sk_test_env")
        assert stripe_api_key(config) == "sk_test_env"

    def test_key_file_is_read_and_stripped(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """[stripe] api_key_file supplies the key when the environment does not."""
        monkeypatch.delenv("STRIPE_API_KEY", raising=False)
        (tmp_path / "stripe.key").write_text("rk_test_file\n")
        text = '[stripe]\nreturn_url = "https://x.test"\napi_key_file = "stripe.key"\n'
        assert stripe_api_key(load_config(write(tmp_path, text))) == "rk_test_file"

    def test_a_key_file_open_to_others_logs_a_warning_without_the_key(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A group- or world-readable key file still works, with a WARNING naming file and mode."""
        monkeypatch.delenv("STRIPE_API_KEY", raising=False)
        key_file = tmp_path / "stripe.key"
        key_file.write_text("rk_test_SECRETKEYFILE0123456789\n")
        key_file.chmod(0o640)
        text = '[stripe]\nreturn_url = "https://x.test"\napi_key_file = "stripe.key"\n'
        with caplog.at_level(logging.WARNING):
            assert stripe_api_key(load_config(write(tmp_path, text))).startswith("rk_test_")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert str(key_file) in warnings[0] and "0640" in warnings[0]
        assert "SECRETKEYFILE" not in caplog.text

    def test_an_owner_only_key_file_logs_no_warning(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Mode 0600 (or systemd's 0400 credential) is what is expected: nothing is logged."""
        monkeypatch.delenv("STRIPE_API_KEY", raising=False)
        key_file = tmp_path / "stripe.key"
        key_file.write_text("rk_test_file\n")
        key_file.chmod(0o400)
        text = '[stripe]\nreturn_url = "https://x.test"\napi_key_file = "stripe.key"\n'
        with caplog.at_level(logging.DEBUG):
            stripe_api_key(load_config(write(tmp_path, text)))
        assert caplog.records == []

    def test_systemd_credential_is_read_when_nothing_else_names_a_key(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With LoadCredential=stripe-api-key:..., the key is read from $CREDENTIALS_DIRECTORY."""
        monkeypatch.delenv("STRIPE_API_KEY", raising=False)
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "stripe-api-key").write_text("rk_live_fromcredential\n")
        (credentials / "stripe-api-key").chmod(0o400)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
        assert stripe_api_key(load_config(write(tmp_path, MINIMAL))) == "rk_live_fromcredential"
        (tmp_path / "stripe.key").write_text("rk_test_file\n")
        text = '[stripe]\nreturn_url = "https://x.test"\napi_key_file = "stripe.key"\n'
        assert stripe_api_key(load_config(write(tmp_path, text))) == "rk_test_file"

    def test_no_key_anywhere_is_a_config_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without the variable or a key file, the error says how to provide the key."""
        monkeypatch.delenv("STRIPE_API_KEY", raising=False)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "no-credentials-here"))
        config = load_config(write(tmp_path, MINIMAL))
        with pytest.raises(ConfigError, match="STRIPE_API_KEY"):
            stripe_api_key(config)

    def test_something_that_is_not_a_stripe_key_is_refused_without_echoing_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A value that is not sk_/rk_ is refused, and the message does not contain it."""
        monkeypatch.setenv("STRIPE_API_KEY", "pk_live_publishable123")
        config = load_config(write(tmp_path, MINIMAL))
        with pytest.raises(ConfigError) as caught:
            stripe_api_key(config)
        assert "pk_live_publishable123" not in str(caught.value)


class TestSecuritySection:
    def test_authserv_id_defaults_to_gmail_and_can_be_changed(self, tmp_path: Path) -> None:
        """[security] authserv_id is mx.google.com unless configured otherwise."""
        assert load_config(write(tmp_path, MINIMAL)).security.authserv_id == "mx.google.com"
        text = MINIMAL + '[security]\nauthserv_id = "mx.example.net"\n'
        assert load_config(write(tmp_path, text)).security.authserv_id == "mx.example.net"

    def test_authserv_id_must_be_a_host_name(self, tmp_path: Path) -> None:
        """An empty or header-like authserv_id is refused, naming the key."""
        text = MINIMAL + '[security]\nauthserv_id = "mx.google.com; dkim=pass"\n'
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, text))
        assert caught.value.key == "security.authserv_id"
