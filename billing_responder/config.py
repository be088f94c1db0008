"""config.toml → frozen dataclasses, validated once.

Every section is a frozen dataclass whose fields are the section's keys; a field without a default
is required. :func:`load_config` rejects unknown sections and keys, wrong types and bad values with
a :class:`~billing_responder.errors.ConfigError` that names the file and the key, so the CLI can
print one line and exit 2. Relative paths resolve against the config file's folder, so the daemon
behaves the same whatever its working directory.

Secrets are never read from this file: the Stripe key comes from ``STRIPE_API_KEY`` or from
``[stripe] api_key_file`` (a systemd credential, for instance), see :func:`stripe_api_key`. A
``[stripe] api_key``, or any value that looks like a Stripe key, is refused without being echoed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import stat
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from billing_responder.errors import ConfigError

log = logging.getLogger(__name__)

#: Where `--config` points when neither the option nor the environment variable is given.
DEFAULT_CONFIG_PATH = "config.toml"
CONFIG_ENV_VAR = "BILLING_RESPONDER_CONFIG"
STRIPE_KEY_ENV_VAR = "STRIPE_API_KEY"


@dataclass(frozen=True)
class GmailConfig:
    """``[gmail]``: how to reach and authorise against the mailbox."""

    token_file: Path = Path("token.json")
    #: The OAuth client (a "Desktop app" client ID) that `billing-responder auth` authorises with.
    client_secrets_file: Path = Path("client_secret.json")
    #: Google Workspace: a service account with domain-wide delegation, acting as delegated_user.
    #: When set, token_file is not used.
    service_account_file: Path | None = None
    delegated_user: str = ""
    token_uri: str = ""
    api_endpoint: str = ""
    user_id: str = "me"
    timeout_seconds: float = 30.0
    #: The mailbox's per-user Gmail quota: the client-side governor keeps every minute under it.
    #: 6,000 for newer Cloud projects, 15,000 for older ones (Google Cloud console, Quotas).
    quota_units_per_minute: int = 6000


@dataclass(frozen=True)
class StripeConfig:
    """``[stripe]``: how to reach Stripe and what portal to open."""

    return_url: str
    api_base: str = ""
    api_key_file: Path | None = None
    portal_configuration: str = ""
    locale: str = ""
    timeout_seconds: float = 30.0
    #: Stripe's rate limits, kept to by the client-side governor. 0: Stripe's published default
    #: for the key's mode (25 read or write requests a second in test mode, 100 in live mode).
    requests_per_second: int = 0
    #: The Search API's own limit (20 read requests a second in either mode).
    search_requests_per_second: int = 20


@dataclass(frozen=True)
class TriageConfig:
    """``[triage]``: which messages count as billing emails."""

    keywords: tuple[str, ...] = ("invoice", "billing")
    max_age_days: float = 7.0


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: how much automatic answering is allowed (see limits.py)."""

    per_sender_hours: float = 24.0
    max_replies_per_hour: int = 60
    max_attempts: int = 10
    #: Replies (sent or drafted) in any 24 hours; Google Workspace stops a mailbox at about 2,000
    #: sent messages a day. Reached: nothing more is sent, the rest goes to a person.
    max_sends_per_day: int = 2000


@dataclass(frozen=True)
class LabelsConfig:
    """``[labels]``: the Gmail labels the responder applies to threads."""

    replied: str = "billing-responder/replied"
    needs_human: str = "billing-responder/needs-human"
    drafted: str = "billing-responder/drafted"


@dataclass(frozen=True)
class ReplyConfig:
    """``[reply]``: how replies look."""

    templates_dir: Path | None = None
    from_name: str = ""
    signature: str = "The support team"
    mark_read: bool = False
    #: "send" the reply, or leave it as a Gmail "draft" in the thread for a person to send.
    mode: str = "send"


@dataclass(frozen=True)
class SecurityConfig:
    """``[security]``: whose word on sender authentication is trusted."""

    authserv_id: str = "mx.google.com"


@dataclass(frozen=True)
class StateConfig:
    """``[state]``: where the ledger of handled messages lives."""

    database: Path = Path("state.db")


@dataclass(frozen=True)
class ScheduleConfig:
    """``[schedule]``: how often the daemon polls."""

    interval_seconds: float = 5.0


@dataclass(frozen=True)
class ConcurrencyConfig:
    """``[concurrency]``: how many messages are handled at once."""

    #: Messages in flight at a time; each worker has its own Gmail connection.
    workers: int = 4


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``: what the daemon writes to stderr."""

    level: str = "INFO"
    mask_addresses: bool = True
    #: "text" (one line per event; priority prefixes under journald) or "json" (one object a line).
    format: str = "text"


@dataclass(frozen=True)
class NotifyConfig:
    """``[notify]``: how the operator hears that the responder stopped working."""

    #: Sent a short message through the mailbox itself, when Gmail still works for sending.
    email: str = ""
    #: Run with the problem in the environment (argv list, no shell), e.g. ["/usr/local/bin/page"].
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the optional Prometheus endpoint."""

    #: "host:port" to serve /metrics on, e.g. "127.0.0.1:9464"; empty: no endpoint.
    listen: str = ""


@dataclass(frozen=True)
class Config:
    """The whole configuration, parsed and validated."""

    path: Path
    stripe: StripeConfig
    gmail: GmailConfig = field(default_factory=GmailConfig)
    triage: TriageConfig = field(default_factory=TriageConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    reply: ReplyConfig = field(default_factory=ReplyConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    state: StateConfig = field(default_factory=StateConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    concurrency: ConcurrencyConfig = field(default_factory=ConcurrencyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


_SECTIONS: dict[str, type[Any]] = {
    "gmail": GmailConfig,
    "stripe": StripeConfig,
    "triage": TriageConfig,
    "labels": LabelsConfig,
    "limits": LimitsConfig,
    "reply": ReplyConfig,
    "security": SecurityConfig,
    "state": StateConfig,
    "schedule": ScheduleConfig,
    "concurrency": ConcurrencyConfig,
    "logging": LoggingConfig,
    "notify": NotifyConfig,
    "metrics": MetricsConfig,
}

#: More workers than this buys nothing against a per-user quota and only holds more connections.
MAX_WORKERS = 32
MIN_QUOTA_UNITS_PER_MINUTE = 500
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
REPLY_MODES = ("send", "draft")
#: The file name `LoadCredential=` gives the Stripe key (systemd/billing-responder.service).
STRIPE_CREDENTIAL_NAME = "stripe-api-key"
# Label names go into Gmail search queries (-label:...), so they keep to characters the search
# syntax leaves alone: letters, digits, "-", "_", "." and "/" for nesting, and single spaces.
_LABEL_NAME = re.compile(r"^[\w.-]+(?:[ /][\w.-]+)*$")
# A Stripe secret or restricted key pasted into some value (api_key_file, most likely).
_STRIPE_SECRET = re.compile(r"(?<![A-Za-z0-9])[sr]k_(?:test|live)_[A-Za-z0-9]{10,}")
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NOT_HERE = (
    f"secret keys do not belong in the config file; set {STRIPE_KEY_ENV_VAR} "
    "or [stripe] api_key_file"
)


def resolve_config_path(cli_value: str | None) -> Path:
    """The config path: the option, else ``$BILLING_RESPONDER_CONFIG``, else ``./config.toml``."""
    return Path(cli_value or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_config(path: Path) -> Config:
    """Read, parse and validate the config file at ``path``."""
    shown = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            shown, "", "no such file (pass --config PATH or set BILLING_RESPONDER_CONFIG)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(shown, "", f"cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(shown, "", f"not valid TOML: {exc}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> Config:
    """Validate already-parsed TOML ``data`` as if it came from ``path``."""
    shown = str(path)
    base = path.resolve().parent
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            known = ", ".join(f"[{s}]" for s in _SECTIONS)
            raise ConfigError(shown, name, f"unknown section or key (known sections: {known})")
        if not isinstance(value, dict):
            raise ConfigError(shown, name, "must be a table, e.g. [" + name + "]")
        sections[name] = _parse_section(name, _SECTIONS[name], value, shown, base)
    for name, cls in _SECTIONS.items():
        # An absent section is an empty one: its required keys are reported, its default paths
        # still resolve against the config file's folder.
        if name not in sections:
            sections[name] = _parse_section(name, cls, {}, shown, base)
    config = Config(path=path, **sections)
    _validate(config, shown)
    return config


def _parse_section(
    name: str, cls: type[Any], values: dict[str, Any], shown: str, base: Path
) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    secret = next((k for k in ("api_key", "secret_key") if k in values), None)
    if name == "stripe" and secret is not None:
        raise ConfigError(shown, f"stripe.{secret}", _NOT_HERE)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        # Checked before anything else looks at the value, as no later message may echo it.
        if any(_STRIPE_SECRET.search(v) for v in _strings(value)):
            raise ConfigError(shown, dotted, "holds what looks like a Stripe key: " + _NOT_HERE)
        if key not in known:
            raise ConfigError(
                shown, dotted, f"unknown key (known keys in [{name}]: {', '.join(known)})"
            )
        kwargs[key] = _coerce(value, hints[key], dotted, shown, base)
    for key, f in known.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and key not in kwargs:
            raise ConfigError(shown, f"{name}.{key}", "required key is missing")
    # Defaults that are paths are relative to the config file too.
    for key, f in known.items():
        if key not in kwargs and isinstance(f.default, Path):
            kwargs[key] = base / f.default
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, dotted: str, shown: str, base: Path) -> Any:  # noqa: PLR0912 - one branch per TOML type
    optional = False
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(shown, dotted, f"must be a path string, not {_toml_type(value)}")
        if optional and value == "":
            return None
        return base / Path(value).expanduser()
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(shown, dotted, f"must be true or false, not {_toml_type(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(shown, dotted, f"must be a number, not {_toml_type(value)}")
        if not math.isfinite(value):
            raise ConfigError(shown, dotted, "must be a finite number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(shown, dotted, f"must be a whole number, not {_toml_type(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(shown, dotted, f"must be a string, not {_toml_type(value)}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(shown, dotted, "must be a list of strings, e.g. [\"a\", \"b\"]")
        return tuple(value)
    raise AssertionError(f"config field {dotted} has an unsupported type {hint!r}")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for kind, label in names.items():
        if type(value) is kind:
            return label
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _validate(config: Config, shown: str) -> None:
    """Checks that span a value's meaning, not just its type."""
    _require_url(config.stripe.return_url, "stripe.return_url", shown, required=True)
    _require_url(config.stripe.api_base, "stripe.api_base", shown)
    _require_url(config.gmail.api_endpoint, "gmail.api_endpoint", shown)
    _require_url(config.gmail.token_uri, "gmail.token_uri", shown)
    if not config.gmail.user_id.strip():
        raise ConfigError(shown, "gmail.user_id", 'must not be empty ("me" is the usual value)')
    _validate_triage_and_labels(config, shown)
    _validate_numbers(config, shown)
    _validate_rest(config, shown)


def _validate_triage_and_labels(config: Config, shown: str) -> None:
    keywords = config.triage.keywords
    if not keywords or any(not k.strip() for k in keywords):
        raise ConfigError(shown, "triage.keywords", "must be a non-empty list of non-empty words")
    if any('"' in k or "(" in k or ")" in k for k in keywords):
        raise ConfigError(shown, "triage.keywords", "keywords may not contain quotes or brackets")
    labels = (
        ("labels.replied", config.labels.replied),
        ("labels.needs_human", config.labels.needs_human),
        ("labels.drafted", config.labels.drafted),
    )
    for dotted, label in labels:
        if not _LABEL_NAME.match(label):
            raise ConfigError(
                shown,
                dotted,
                f"{label!r} is not a usable label name (letters, digits, - _ . and / to nest)",
            )
    for position, (dotted, label) in enumerate(labels):
        for earlier_dotted, earlier in labels[:position]:
            if label.casefold() == earlier.casefold():
                raise ConfigError(shown, dotted, f"must differ from {earlier_dotted}")


def _validate_numbers(config: Config, shown: str) -> None:
    if config.schedule.interval_seconds < 1:
        raise ConfigError(shown, "schedule.interval_seconds", "must be at least 1 second")
    for dotted, positive in (
        ("gmail.timeout_seconds", config.gmail.timeout_seconds),
        ("stripe.timeout_seconds", config.stripe.timeout_seconds),
        ("triage.max_age_days", config.triage.max_age_days),
        ("limits.per_sender_hours", config.limits.per_sender_hours),
        ("limits.max_replies_per_hour", config.limits.max_replies_per_hour),
        ("limits.max_attempts", config.limits.max_attempts),
        ("limits.max_sends_per_day", config.limits.max_sends_per_day),
        ("concurrency.workers", config.concurrency.workers),
        ("stripe.search_requests_per_second", config.stripe.search_requests_per_second),
    ):
        if positive <= 0:
            raise ConfigError(shown, dotted, "must be greater than 0")
    if config.stripe.requests_per_second < 0:
        raise ConfigError(
            shown, "stripe.requests_per_second", "must be 0 (Stripe's default) or more"
        )
    if config.concurrency.workers > MAX_WORKERS:
        raise ConfigError(shown, "concurrency.workers", f"must be at most {MAX_WORKERS}")
    if config.gmail.quota_units_per_minute < MIN_QUOTA_UNITS_PER_MINUTE:
        # Below this no minute holds a reply (a send alone costs 100 units) plus its burst.
        raise ConfigError(
            shown,
            "gmail.quota_units_per_minute",
            f"must be at least {MIN_QUOTA_UNITS_PER_MINUTE} (one send costs 100 units)",
        )


def _validate_rest(config: Config, shown: str) -> None:
    authserv_id = config.security.authserv_id
    if not authserv_id or any(c.isspace() or c == ";" for c in authserv_id):
        raise ConfigError(
            shown, "security.authserv_id", "must be a host name such as mx.google.com"
        )
    if config.logging.level.upper() not in _LOG_LEVELS:
        raise ConfigError(shown, "logging.level", f"must be one of {', '.join(_LOG_LEVELS)}")
    _one_of(config.logging.format, LOG_FORMATS, "logging.format", shown)
    _one_of(config.reply.mode, REPLY_MODES, "reply.mode", shown)
    gmail = config.gmail
    if (gmail.service_account_file is None) != (not gmail.delegated_user):
        raise ConfigError(
            shown,
            "gmail.delegated_user" if gmail.service_account_file else "gmail.service_account_file",
            "service_account_file and delegated_user go together (a service account acts as "
            "the mailbox's user through domain-wide delegation)",
        )
    if gmail.delegated_user and not _ADDRESS.match(gmail.delegated_user):
        raise ConfigError(shown, "gmail.delegated_user", "must be the mailbox's email address")
    if config.notify.email and not _ADDRESS.match(config.notify.email):
        raise ConfigError(shown, "notify.email", "must be one email address")
    if config.notify.command and not config.notify.command[0].strip():
        raise ConfigError(shown, "notify.command", "must start with the program to run")
    if config.metrics.listen:
        parse_listen(config.metrics.listen, "metrics.listen", shown)
    templates = config.reply.templates_dir
    if templates is not None and not templates.is_dir():
        raise ConfigError(shown, "reply.templates_dir", f"{templates} is not a folder")


def _one_of(value: str, allowed: tuple[str, ...], dotted: str, shown: str) -> None:
    if value not in allowed:
        raise ConfigError(shown, dotted, f"must be one of {', '.join(repr(a) for a in allowed)}")


def parse_listen(value: str, dotted: str, shown: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` → ``("127.0.0.1", 9464)``; ``[::1]:9464`` for IPv6."""
    host, colon, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(shown, dotted, f"{value!r} is not host:port, e.g. 127.0.0.1:9464")
    return host, int(port)


def _require_url(value: str, dotted: str, shown: str, *, required: bool = False) -> None:
    if not value and not required:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(shown, dotted, f"{value!r} is not an http(s) URL")


def stripe_api_key(config: Config) -> str:
    """The Stripe secret key: ``$STRIPE_API_KEY``, else the file ``[stripe] api_key_file``, else
    the systemd credential ``$CREDENTIALS_DIRECTORY/stripe-api-key`` (``LoadCredential=``)."""
    from_env = os.environ.get(STRIPE_KEY_ENV_VAR, "").strip()
    shown = str(config.path)
    if from_env:
        return _checked_key(from_env, shown, STRIPE_KEY_ENV_VAR)
    key_file = config.stripe.api_key_file
    credentials = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if key_file is None and credentials:
        # systemd's LoadCredential=stripe-api-key:... puts the key here for the service only.
        candidate = Path(credentials) / STRIPE_CREDENTIAL_NAME
        key_file = candidate if candidate.is_file() else None
    if key_file is None:
        raise ConfigError(
            shown,
            "stripe.api_key_file",
            f"no Stripe key: set {STRIPE_KEY_ENV_VAR}, point [stripe] api_key_file at a file, "
            f"or pass the credential {STRIPE_CREDENTIAL_NAME} with systemd's LoadCredential=",
        )
    try:
        key = key_file.read_text(encoding="utf-8").strip()
        mode = stat.S_IMODE(key_file.stat().st_mode)
    except OSError as exc:
        raise ConfigError(shown, "stripe.api_key_file", f"cannot read {key_file}: {exc}") from None
    if not key:
        raise ConfigError(shown, "stripe.api_key_file", f"{key_file} is empty")
    if mode & 0o077:
        log.warning(
            "the Stripe key file %s is open to other users (mode %04o); make it readable by "
            "its owner only: chmod 600 %s",
            key_file, mode, key_file,
        )
    return _checked_key(key, shown, "stripe.api_key_file")


def _checked_key(key: str, shown: str, source: str) -> str:
    # Only the prefix is ever shown: the key itself must not reach a log or a terminal.
    if not key.startswith(("sk_", "rk_")):
        raise ConfigError(
            shown,
            source,
            "does not hold a Stripe secret or restricted key (expected sk_... or rk_...)",
        )
    return key
