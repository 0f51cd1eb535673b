"""Effective settings: embedded defaults, then a TOML file, then ``EMBARGO_*``
environment variables. Built once by :func:`load_settings` and passed in.

One table, :data:`FIELDS`, drives all three sources, the validation and
``embargo config show``, so a setting cannot be documented in one place and
forgotten in another. Code reads the validated values as typed attributes,
one frozen dataclass per section (``settings.mail.smtp_port`` is an ``int``);
:func:`load_settings` refuses to build settings whose table and attributes
disagree.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from config.errors import ConfigError

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", re.ASCII)


def parse_duration(text: str) -> timedelta:
    """Parse ``"24h"``, ``"90m"``, ``"1h30m"``, ``"2d"`` or ``"45s"``.

    Raises ValueError with the offending text when it is not such a duration."""
    match = _DURATION.match(text.strip().lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration like 24h, 90m, 1h30m, 2d or 45s")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    try:
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:
        raise ValueError(f"duration {text!r} is too long") from None


@dataclass(frozen=True, kw_only=True)
class Location:
    """Where sealed objects or published documents live: a local folder or an
    S3 bucket and key prefix."""

    kind: str  # "folder" or "s3"
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""

    @classmethod
    def parse(cls, text: str, *, base: Path) -> Location:
        if text.startswith("s3://"):
            rest = text[len("s3://") :]
            bucket, _, prefix = rest.partition("/")
            if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"{text!r}: {bucket!r} is not a valid S3 bucket name")
            prefix = prefix.strip("/")
            return cls(kind="s3", bucket=bucket, prefix=f"{prefix}/" if prefix else "")
        if "://" in text:
            raise ValueError(f"{text!r}: use a folder path or s3://bucket/prefix")
        path = Path(text).expanduser()
        return cls(kind="folder", path=path if path.is_absolute() else base / path)

    def __str__(self) -> str:
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.prefix}"
        return str(self.path)


@dataclass(frozen=True, kw_only=True)
class Field:
    key: str  # dotted TOML key, e.g. "mail.smtp_host"
    default: Any
    check: Callable[[Any], Any]
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return "EMBARGO_" + self.key.replace(".", "_").upper()


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value


def _optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _text(value)


def _zone(value: Any) -> str:
    name = _text(value)
    if name in ("localtime", "posixrules"):
        raise ValueError(f"{name!r} means this machine's zone; give an IANA name such as "
                         "Europe/London")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. Europe/London)") from None
    return name


def _time_of_day(value: Any) -> str:
    text = _text(value)
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text)
    if match is None:
        raise ValueError(f"{text!r} is not a 24-hour time like 00:01")
    return text


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _text(value).lower()
        if text not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return text

    return check


def _number(low: float, high: float, kind: type = float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if isinstance(value, bool) or not low <= number <= high:
            raise ValueError(f"{value!r} is not between {low:g} and {high:g}")
        return number

    return check


def _optional_duration(value: Any) -> timedelta | None:
    if value is None or value == "":
        return None
    return parse_duration(_text(value))


def _horizon(value: Any) -> timedelta:
    horizon = parse_duration(_text(value))
    if horizon < timedelta(minutes=1):
        raise ValueError(f"{value!r} is shorter than a minute: a release would get its timer "
                         "too late to be woken on time")
    return horizon


_EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")


def _addresses(value: Any) -> tuple[str, ...]:
    """A list of email addresses: a TOML array, or comma-separated text (the
    environment)."""
    if isinstance(value, str):
        items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"expected a list of email addresses, got {value!r}")
    addresses: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _EMAIL.match(item.strip()):
            raise ValueError(f"{item!r} is not an email address")
        if item.strip() not in addresses:
            addresses.append(item.strip())
    return tuple(addresses)


def _url_or_none(value: Any) -> str | None:
    text = _optional_text(value)
    if text is not None and not re.match(r"^https?://[^\s/]+", text):
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text.rstrip("/") if text else None


def _leads(value: Any) -> tuple[timedelta, ...]:
    """Durations before an instant: a TOML array (or one duration), or
    comma-separated text (the environment); longest first."""
    if isinstance(value, str):
        items: list[Any] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"expected a list of durations like [\"24h\", \"1h\"], got {value!r}")
    leads = {parse_duration(item) if isinstance(item, str) else _bad_duration(item)
             for item in items}
    return tuple(sorted(leads, reverse=True))


def _bad_duration(item: Any) -> timedelta:
    raise ValueError(f"{item!r} is not a duration like 24h, 90m, 1h30m, 2d or 45s")


def _listen(value: Any) -> str:
    """``host:port`` to listen on, required (the console has no off)."""
    text = _bind(value)
    if text is None:
        raise ValueError("give host:port, e.g. 127.0.0.1:8080")
    return text


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _bind(value: Any) -> str | None:
    """``host:port`` to listen on, or empty (off)."""
    text = _optional_text(value)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port, e.g. 127.0.0.1:9464")
    return text


FIELDS: tuple[Field, ...] = (
    Field(key="data_dir", default="var", check=_text,
          help="folder for the embedded defaults (database, vault, public, outbox, keys)"),
    Field(key="zone", default="Europe/London", check=_zone, help="default IANA time zone"),
    Field(key="default_at", default="00:01", check=_time_of_day,
          help="default time of day for a publication date"),
    Field(key="database.url", default="", check=_optional_text,
          help="SQLAlchemy URL; empty means sqlite:///<data_dir>/embargo.db"),
    Field(key="storage.vault", default="", check=_optional_text,
          help="sealed objects: a folder or s3://bucket/prefix; empty means <data_dir>/vault"),
    Field(key="storage.public", default="", check=_optional_text,
          help="published documents: a folder or s3://bucket/prefix; "
               "empty means <data_dir>/public"),
    Field(key="storage.staging", default="", check=_optional_text,
          help="the publishing node's private folder for documents decrypted before the "
               "instant; empty means beside a public folder (<public>.staging, same "
               "filesystem), or <data_dir>/staging for S3"),
    Field(key="storage.public_base_url", default="", check=_url_or_none,
          help="web address the public location is served at (links in notices)"),
    Field(key="keys.dir", default="", check=_optional_text,
          help="folder of the publisher's key pair; empty means <data_dir>/keys"),
    Field(key="s3.region", default="", check=_optional_text, help="AWS region"),
    Field(key="s3.endpoint_url", default="", check=_url_or_none,
          help="endpoint of an S3-compatible server (MinIO, Ceph, ...)"),
    Field(key="s3.addressing_style", default="auto", check=_choice("auto", "path", "virtual"),
          help="S3 addressing style"),
    Field(key="s3.acl", default="", check=_optional_text,
          help="canned ACL for published objects, e.g. public-read; empty relies on a policy"),
    Field(key="s3.cache_control", default="public, max-age=300", check=_text,
          help="Cache-Control of published objects"),
    Field(key="s3.verify", default="checksum", check=_choice("checksum", "head"),
          help="how a published document is confirmed: checksum, by the SHA-256 its "
               "create-only PUT returns (the store checked the bytes against it, as AWS S3 "
               "does); head, by a HEAD after every PUT as well, for stores that do not check "
               "x-amz-checksum-sha256 (either way the bytes are read back where the store "
               "keeps no SHA-256 of the whole object)"),
    Field(key="mail.transport", default="file", check=_choice("file", "smtp"),
          help="file: .eml files in mail.outbox_dir, for trying Embargo out (a copy "
               "delivered there is plaintext on this disk); smtp: a mail server"),
    Field(key="mail.sender", default="Embargo <embargo@localhost>", check=_text,
          help="From: address of notices"),
    Field(key="mail.outbox_dir", default="", check=_optional_text,
          help="folder for .eml files; empty means <data_dir>/outbox"),
    Field(key="mail.smtp_host", default="localhost", check=_text, help="SMTP host"),
    Field(key="mail.smtp_port", default=587, check=_number(1, 65535, int), help="SMTP port"),
    Field(key="mail.smtp_security", default="starttls", check=_choice("starttls", "tls", "none"),
          help="starttls, tls (implicit) or none"),
    Field(key="mail.smtp_username", default="", check=_optional_text, help="SMTP user name"),
    Field(key="mail.smtp_password", default="", check=_optional_text, secret=True,
          help="SMTP password (set EMBARGO_MAIL_SMTP_PASSWORD, not the file)"),
    Field(key="mail.workers", default=4, check=_number(1, 32, int),
          help="notices handed to the mail server at once (one connection each)"),
    Field(key="mail.record_batch", default=8, check=_number(1, 64, int),
          help="deliveries a relay worker records in one transaction (or after 10 ms, "
               "whichever first; the notices of a publication from 3/4 of it or 25 ms); "
               "a relay killed between handing notices over and "
               "recording them sends at most this many again per worker, same Message-ID"),
    Field(key="mail.give_up_after", default="24h", check=parse_duration,
          help="a notice the mail server cannot take (4xx, no connection) is retried with "
               "backoff this long, then given up and alerted (`embargo resend` sends it "
               "again); a 5xx about the message or its recipient fails at once, alerted"),
    Field(key="scheduler.poll_seconds", default=0.5, check=_number(0.05, 60),
          help="how often the scheduler re-reads the database for changes"),
    Field(key="scheduler.lease_seconds", default=3.0, check=_number(1, 3600),
          help="how long a publisher's claim lasts unrenewed: a node that dies "
               "mid-publish is taken over this long after its last renewal"),
    Field(key="scheduler.max_skew_ms", default=500.0, check=_number(1, 600_000),
          help="a node whose clock differs from the database server's by more than "
               "this refuses to publish"),
    Field(key="scheduler.skew_check_seconds", default=60.0, check=_number(1, 3600),
          help="how often a node measures its clock against the database server"),
    Field(key="scheduler.workers", default=16, check=_number(1, 512, int),
          help="threads that run jobs; releases due together do not wait for each other"),
    Field(key="scheduler.publish_workers", default=4, check=_number(1, 64, int),
          help="documents of one release written to the public location at once"),
    Field(key="scheduler.horizon", default="1h", check=_horizon,
          help="releases due within this get a timer; the rest are looked at again every "
               "half horizon (so start-up grows with what is due soon, not all queued)"),
    Field(key="scheduler.lead_seconds", default=0.5, check=_number(0, 600),
          help="the job wakes this early, decrypts and verifies every document into private "
               "staging, then waits for the exact instant"),
    Field(key="scheduler.staging_mib_per_second", default=50.0, check=_number(1, 100_000),
          help="the rate assumed for decrypting and verifying into private staging: the "
               "job for an instant wakes lead_seconds plus the bytes due then at this rate "
               "early (set it below what this node measures: its log says, per release)"),
    Field(key="testing.clock_offset_ms", default=0.0, check=_number(-86_400_000, 86_400_000),
          help="shift this node's clock (rehearsals of clock trouble only; the skew check "
               "stops such a node from publishing)"),
    Field(key="copies.cutoff", default="60s", check=parse_duration,
          help="a pre-embargo copy must start this long before the embargo at the latest, "
               "so none is still on its way at the instant"),
    Field(key="alerts.to", default=(), check=_addresses,
          help="who is told when a release is at risk (besides its owner): a list of "
               "addresses, comma-separated in the environment"),
    Field(key="alerts.repeat", default="15m", check=parse_duration,
          help="an alert about a fault that lasts is sent again this often"),
    Field(key="approval.required", default=False, check=_bool,
          help="a release waits in awaiting_approval until a second person with the "
               "approver role approves it (from the console or `embargo approve`)"),
    Field(key="approval.warn_before", default="2h", check=parse_duration,
          help="owner and approvers are told this long before the instant of a release "
               "still awaiting approval, and again at the instant"),
    Field(key="web.bind", default="127.0.0.1:8080", check=_listen,
          help="where `embargo web` listens (HOST:PORT); put a TLS reverse proxy in front"),
    Field(key="web.base_url", default="http://localhost:8080", check=_url_or_none,
          help="the address people open the console at: its origin is checked on every "
               "form, and cookies are Secure unless it is plain http://localhost"),
    Field(key="web.session_idle", default="30m", check=parse_duration,
          help="a console session ends after this long without a request"),
    Field(key="web.session_max", default="12h", check=parse_duration,
          help="a console session ends this long after sign-in, however busy"),
    Field(key="web.min_lead", default="15m", check=parse_duration,
          help="the console refuses to submit a release due sooner than this"),
    Field(key="copies.max_lead", default="", check=_optional_duration,
          help="refuse pre-embargo copies earlier than this before the embargo, e.g. 24h"),
    Field(key="rehearsal.before", default=("1h",), check=_leads,
          help="each queued release is rehearsed this long before its instant (a list, "
               "e.g. [\"24h\", \"1h\"]; empty: only `embargo rehearse`)"),
    Field(key="rehearsal.min_nodes", default=1, check=_number(0, 100, int),
          help="a rehearsal wants at least this many live nodes with a good clock"),
    Field(key="rehearsal.mail_passed", default=True, check=_bool,
          help="mail a short note when a rehearsal passes (a failure is always mailed)"),
    Field(key="alerts.overdue_after", default="30s", check=parse_duration,
          help="a release not published this long after its instant is alerted as overdue"),
    Field(key="alerts.heartbeat_url", default="", check=_url_or_none,
          help="dead man's switch: each node requests this URL every alerts.heartbeat_every"),
    Field(key="alerts.heartbeat_every", default=60.0, check=_number(1, 86_400),
          help="seconds between heartbeat requests"),
    Field(key="metrics.bind", default="127.0.0.1:9464", check=_bind,
          help="host:port of /metrics and /healthz on `embargo run`; empty turns it off"),
    Field(key="log.format", default="text", check=_choice("text", "json"),
          help="text, or json: one JSON object a line (release id, node, event)"),
    Field(key="copies.unstampable", default="refuse", check=_choice("refuse", "send-unmarked"),
          help="a PDF that cannot be stamped with the embargo and copy id: refuse it at "
               "queue, or send-unmarked (the copy id then travels in the message only)"),
)


# One frozen dataclass per section of FIELDS; each attribute is the key after
# the section's dot, typed as its check returns it.
@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    url: str | None


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    vault: str | None
    public: str | None
    staging: str | None
    public_base_url: str | None


@dataclass(frozen=True, kw_only=True)
class KeysSettings:
    dir: str | None


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    region: str | None
    endpoint_url: str | None
    addressing_style: str
    acl: str | None
    cache_control: str
    verify: str


@dataclass(frozen=True, kw_only=True)
class MailSettings:
    transport: str
    sender: str
    outbox_dir: str | None
    smtp_host: str
    smtp_port: int
    smtp_security: str
    smtp_username: str | None
    smtp_password: str | None
    workers: int
    record_batch: int
    give_up_after: timedelta


@dataclass(frozen=True, kw_only=True)
class SchedulerSettings:
    poll_seconds: float
    lease_seconds: float
    max_skew_ms: float
    skew_check_seconds: float
    workers: int
    publish_workers: int
    horizon: timedelta
    lead_seconds: float
    staging_mib_per_second: float


@dataclass(frozen=True, kw_only=True)
class TestingSettings:
    clock_offset_ms: float


@dataclass(frozen=True, kw_only=True)
class CopiesSettings:
    cutoff: timedelta
    max_lead: timedelta | None
    unstampable: str  # refuse or send-unmarked


@dataclass(frozen=True, kw_only=True)
class AlertsSettings:
    to: tuple[str, ...]
    repeat: timedelta
    overdue_after: timedelta
    heartbeat_url: str | None
    heartbeat_every: float


@dataclass(frozen=True, kw_only=True)
class RehearsalSettings:
    before: tuple[timedelta, ...]
    min_nodes: int
    mail_passed: bool


@dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    bind: str | None


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    format: str  # text or json


@dataclass(frozen=True, kw_only=True)
class ApprovalSettings:
    required: bool
    warn_before: timedelta


@dataclass(frozen=True, kw_only=True)
class WebSettings:
    bind: str  # HOST:PORT
    base_url: str | None
    session_idle: timedelta
    session_max: timedelta
    min_lead: timedelta


SECTIONS: Mapping[str, type] = {
    "database": DatabaseSettings, "storage": StorageSettings, "keys": KeysSettings,
    "s3": S3Settings, "mail": MailSettings, "scheduler": SchedulerSettings,
    "testing": TestingSettings, "copies": CopiesSettings, "alerts": AlertsSettings,
    "rehearsal": RehearsalSettings, "metrics": MetricsSettings, "log": LogSettings,
    "approval": ApprovalSettings, "web": WebSettings,
}
TOP_LEVEL = ("data_dir", "zone", "default_at")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated, effective settings. Build with :func:`load_settings`."""

    data_dir: Path
    zone: str
    default_at: str
    database: DatabaseSettings
    storage: StorageSettings
    keys: KeysSettings
    s3: S3Settings
    mail: MailSettings
    scheduler: SchedulerSettings
    testing: TestingSettings
    copies: CopiesSettings
    alerts: AlertsSettings
    rehearsal: RehearsalSettings
    metrics: MetricsSettings
    log: LogSettings
    approval: ApprovalSettings
    web: WebSettings
    values: Mapping[str, object]  # by dotted key, for ``config show``
    sources: Mapping[str, str] = field(default_factory=dict)
    config_file: Path | None = None

    def _under_data(self, text: str | None, default: str) -> Path:
        path = Path(text).expanduser() if text else self.data_dir / default
        return path if path.is_absolute() else self.data_dir / path

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'embargo.db'}"

    @property
    def vault(self) -> Location:
        return Location.parse(self.storage.vault or "vault", base=self.data_dir)

    @property
    def public(self) -> Location:
        return Location.parse(self.storage.public or "public", base=self.data_dir)

    @property
    def staging_dir(self) -> Path:
        if self.storage.staging:
            return self._under_data(self.storage.staging, "staging")
        public = self.public
        if public.kind != "s3" and public.path is not None:
            return public.path.with_name(public.path.name + ".staging")
        return self.data_dir / "staging"

    @property
    def keys_dir(self) -> Path:
        return self._under_data(self.keys.dir, "keys")

    @property
    def outbox_dir(self) -> Path:
        return self._under_data(self.mail.outbox_dir, "outbox")

    def public_dict(self) -> dict[str, object]:
        """Every setting with secrets masked, for ``embargo config show``."""
        shown: dict[str, object] = {}
        for f in FIELDS:
            value = self.values[f.key]
            if f.secret and value:
                value = "(set)"
            elif f.key == "database.url" and isinstance(value, str) and value:
                value = _mask_url(value)
            elif isinstance(value, timedelta):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, timedelta) else v for v in value]
            shown[f.key] = value
        shown["(effective) database.url"] = _mask_url(self.database_url)
        shown["(effective) storage.vault"] = str(self.vault)
        shown["(effective) storage.public"] = str(self.public)
        shown["(effective) keys.dir"] = str(self.keys_dir)
        shown["(effective) mail.outbox_dir"] = str(self.outbox_dir)
        return shown


_SECRET_PARAMS = r"(?:password|passwd|pwd|pass|secret|token|sslpassword|access_key|secret_key)"


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: in the user part
    (``user:pw@host``) and in query parameters (``?password=pw``)."""
    url = re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", url)
    return re.sub(rf"((?:^|[?&;\s]){_SECRET_PARAMS}\s*=\s*)[^&;#\s]*", r"\1***", url,
                  flags=re.IGNORECASE)


_mask_url = mask_url


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def load_settings(
    *,
    config_file: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Build the effective settings: defaults, then the TOML file
    (``config_file`` or ``EMBARGO_CONFIG``), then ``EMBARGO_*`` variables,
    then ``overrides`` (command-line options).

    Raises ConfigError naming the file, the key and what is wrong."""
    env = dict(os.environ if environ is None else environ)
    base = cwd or Path.cwd()
    raw: dict[str, Any] = {f.key: f.default for f in FIELDS}
    sources = {f.key: "default" for f in FIELDS}
    known = {f.key for f in FIELDS}

    path_text = str(config_file) if config_file else env.get("EMBARGO_CONFIG", "")
    path: Path | None = None
    if path_text:
        path = Path(path_text).expanduser()
        try:
            with path.open("rb") as handle:
                table = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, value in _flatten(table).items():
            if key not in known:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            raw[key] = value
            sources[key] = str(path)

    env_names = {f.env: f.key for f in FIELDS}
    for name, value in env.items():
        if name.startswith("EMBARGO_") and name != "EMBARGO_CONFIG":
            if name not in env_names:
                raise ConfigError(f"unknown environment variable {name}")
            raw[env_names[name]] = value
            sources[env_names[name]] = name

    for key, value in (overrides or {}).items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            raw[key] = value
            sources[key] = "command line"

    values: dict[str, Any] = {}
    for f in FIELDS:
        try:
            values[f.key] = f.check(raw[f.key])
        except ValueError as exc:
            raise ConfigError(f"setting {f.key} (from {sources[f.key]}): {exc}") from None
    data_dir = Path(values["data_dir"]).expanduser()
    values["data_dir"] = str(data_dir if data_dir.is_absolute() else base / data_dir)
    settings = _typed(values, sources, path)
    for key in ("storage.vault", "storage.public"):
        try:
            getattr(settings, key.split(".")[1])
        except ValueError as exc:
            raise ConfigError(f"setting {key} (from {sources[key]}): {exc}") from None
    return settings


def _typed(values: Mapping[str, Any], sources: Mapping[str, str],
           config_file: Path | None) -> Settings:
    """The validated values as typed sections. A key of FIELDS without an
    attribute (or the reverse) is a programming error, raised here."""
    sections: dict[str, Any] = {}
    expected = set(TOP_LEVEL)
    for name, cls in SECTIONS.items():
        names = [f.name for f in fields(cls)]
        expected.update(f"{name}.{attr}" for attr in names)
        sections[name] = cls(**{attr: values[f"{name}.{attr}"] for attr in names})
    if expected != set(values):
        raise AssertionError("FIELDS and the Settings attributes disagree: "
                             f"{sorted(expected ^ set(values))}")
    return Settings(data_dir=Path(values["data_dir"]), zone=values["zone"],
                    default_at=values["default_at"], values=dict(values), sources=sources,
                    config_file=config_file, **sections)
