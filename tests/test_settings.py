"""Settings: defaults, a TOML file, EMBARGO_* overrides, validated once."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import FIELDS, Location, Settings, load_settings


def write_config(folder: Path, text: str) -> Path:
    path = folder / "embargo.toml"
    path.write_text(textwrap.dedent(text))
    return path


# -- defaults --------------------------------------------------------------------------
def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(environ={}, cwd=tmp_path)
    var = tmp_path / "var"
    assert settings.data_dir == var
    assert settings.zone == "Europe/London"
    assert settings.default_at == "00:01"
    assert settings.database_url == f"sqlite:///{var / 'embargo.db'}"
    assert settings.vault == Location(kind="folder", path=var / "vault")
    assert settings.public == Location(kind="folder", path=var / "public")
    assert settings.keys_dir == var / "keys"
    assert settings.outbox_dir == var / "outbox"
    assert settings.mail.transport == "file"
    assert settings.mail.smtp_port == 587
    assert settings.copies.max_lead is None
    assert settings.config_file is None
    assert set(settings.sources.values()) == {"default"}


def test_every_field_has_a_default_that_passes_its_own_check() -> None:
    for f in FIELDS:
        f.check(f.default)
        assert f.env.startswith("EMBARGO_") and f.help


# -- a TOML file -----------------------------------------------------------------------
def test_toml_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, """\
        zone = "Europe/Paris"
        default_at = "06:00"
        [mail]
        transport = "smtp"
        smtp_host = "mail.example"
        smtp_port = 2525
        [copies]
        max_lead = "24h"
        """)
    settings = load_settings(config_file=path, environ={}, cwd=tmp_path)
    assert settings.zone == "Europe/Paris"
    assert settings.default_at == "06:00"
    assert settings.mail.transport == "smtp"
    assert settings.mail.smtp_host == "mail.example"
    assert settings.mail.smtp_port == 2525
    assert settings.copies.max_lead == timedelta(hours=24)
    assert settings.sources["zone"] == str(path)
    assert settings.sources["mail.smtp_port"] == str(path)
    assert settings.sources["mail.sender"] == "default"
    assert settings.config_file == path


def test_toml_file_named_by_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'zone = "Europe/Dublin"\n')
    settings = load_settings(environ={"EMBARGO_CONFIG": str(path)}, cwd=tmp_path)
    assert settings.zone == "Europe/Dublin"
    assert settings.config_file == path


def test_environment_overrides_the_file_and_options_override_both(tmp_path: Path) -> None:
    path = write_config(tmp_path, """\
        zone = "Europe/Paris"
        data_dir = "from-file"
        [mail]
        smtp_port = 2525
        """)
    env = {"EMBARGO_ZONE": "America/New_York", "EMBARGO_MAIL_SMTP_PORT": "465",
           "EMBARGO_DATA_DIR": "from-env"}
    settings = load_settings(config_file=path, environ=env, cwd=tmp_path)
    assert settings.zone == "America/New_York"
    assert settings.sources["zone"] == "EMBARGO_ZONE"
    assert settings.mail.smtp_port == 465
    assert settings.data_dir == tmp_path / "from-env"
    settings = load_settings(config_file=path, environ=env, cwd=tmp_path,
                             overrides={"data_dir": "from-option"})
    assert settings.data_dir == tmp_path / "from-option"
    assert settings.sources["data_dir"] == "command line"


@pytest.mark.parametrize(("text", "wrong"), [
    ('[mail]\nsmtp_hots = "x"\n', "mail.smtp_hots"),
    ('colour = "red"\n', "colour"),
    ('[storage]\nvault = "v"\n[storage.extra]\ndeep = 1\n', "storage.extra.deep"),
])
def test_unknown_key_in_file_is_named(tmp_path: Path, text: str, wrong: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, environ={}, cwd=tmp_path)
    assert repr(wrong) in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_environment_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="EMBARGO_ZONEE"):
        load_settings(environ={"EMBARGO_ZONEE": "Europe/London"}, cwd=tmp_path)


def test_missing_and_broken_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.toml", environ={}, cwd=tmp_path)
    path = write_config(tmp_path, "zone = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_file=path, environ={}, cwd=tmp_path)


# -- bad values: the key and where it came from -------------------------------------------
BAD_VALUES = [
    ("zone", "Mars/Olympus_Mons"),
    ("zone", "Europe/London/"),
    ("zone", "/etc/passwd"),
    ("zone", ""),
    ("default_at", "24:00"),
    ("default_at", "7pm"),
    ("default_at", "0:01"),
    ("mail.smtp_port", "0"),
    ("mail.smtp_port", "70000"),
    ("mail.smtp_port", "smtp"),
    ("mail.transport", "pigeon"),
    ("mail.give_up_after", "soon"),
    ("scheduler.poll_seconds", "0"),
    ("scheduler.horizon", "30s"),
    ("scheduler.horizon", "soon"),
    ("mail.workers", "0"),
    ("copies.max_lead", "a day"),
    ("s3.endpoint_url", "ftp://s3.example"),
    ("storage.vault", "s3://Bad_Bucket/x"),
    ("storage.public", "ftp://host/x"),
]


def _env_name(key: str) -> str:
    return "EMBARGO_" + key.replace(".", "_").upper()


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_value_from_environment_names_key_and_source(
        tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={_env_name(key): value}, cwd=tmp_path)
    message = str(info.value)
    assert key in message and _env_name(key) in message
    assert "\n" not in message


@pytest.mark.parametrize(("key", "value"), [
    ("zone", "Mars/Olympus_Mons"), ("default_at", "25:61"), ("mail.smtp_port", 0),
    ("mail.smtp_port", 65536), ("mail.smtp_port", "587x"), ("mail.smtp_port", True),
    ("scheduler.workers", 0), ("zone", 5),
])
def test_bad_value_from_file_names_key_and_file(
        tmp_path: Path, key: str, value: object) -> None:
    section, _, name = key.rpartition(".")
    literal = {True: "true"}.get(value, None) if isinstance(value, bool) else None
    if literal is None:
        literal = f'"{value}"' if isinstance(value, str) else str(value)
    body = f"[{section}]\n{name} = {literal}\n" if section else f"{name} = {literal}\n"
    path = write_config(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, environ={}, cwd=tmp_path)
    assert key in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("zone", ["localtime", "posixrules"])
def test_machine_local_zone_names_are_refused(tmp_path: Path, zone: str) -> None:
    # These exist as files under the zoneinfo folder but mean "whatever this
    # machine is set to"; release/timerules.py refuses them at queue time, so
    # accepting them here makes every later queue fail.
    with pytest.raises(ConfigError, match="zone"):
        load_settings(environ={"EMBARGO_ZONE": zone}, cwd=tmp_path)


@pytest.mark.parametrize(("value", "expected"), [
    ("587", 587), ("1", 1), ("65535", 65535)])
def test_port_from_environment_is_an_int(tmp_path: Path, value: str, expected: int) -> None:
    settings = load_settings(environ={"EMBARGO_MAIL_SMTP_PORT": value}, cwd=tmp_path)
    assert settings.mail.smtp_port == expected
    assert isinstance(settings.mail.smtp_port, int)


@pytest.mark.parametrize(("text", "expected"), [
    ("24h", timedelta(hours=24)), ("90m", timedelta(minutes=90)),
    ("1h30m", timedelta(hours=1, minutes=30)), ("2d", timedelta(days=2)), ("", None)])
def test_durations(tmp_path: Path, text: str, expected: timedelta | None) -> None:
    settings = load_settings(environ={"EMBARGO_COPIES_MAX_LEAD": text}, cwd=tmp_path)
    assert settings.copies.max_lead == expected


# -- data dir and derived paths ------------------------------------------------------------
def test_relative_data_dir_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    settings = load_settings(environ={"EMBARGO_DATA_DIR": "store/var"}, cwd=tmp_path)
    var = tmp_path / "store" / "var"
    assert settings.data_dir == var
    assert settings.database_url == f"sqlite:///{var / 'embargo.db'}"
    assert settings.vault.path == var / "vault"
    assert settings.keys_dir == var / "keys"


def test_relative_data_dir_uses_the_process_cwd_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).data_dir == tmp_path / "var"


def test_absolute_data_dir(tmp_path: Path) -> None:
    settings = load_settings(environ={"EMBARGO_DATA_DIR": str(tmp_path / "abs")},
                             cwd=Path("/"))
    assert settings.data_dir == tmp_path / "abs"


def test_relative_storage_folders_are_under_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(environ={"EMBARGO_STORAGE_VAULT": "sealed",
                                      "EMBARGO_STORAGE_PUBLIC": str(tmp_path / "www")},
                             cwd=tmp_path)
    assert settings.vault.path == tmp_path / "var" / "sealed"
    assert settings.public.path == tmp_path / "www"


def test_relative_paths_do_not_move_when_the_process_changes_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings are resolved once, at load: a relative keys.dir or
    mail.outbox_dir must not follow a later chdir (nor ignore ``cwd=``)."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    settings = load_settings(environ={"EMBARGO_KEYS_DIR": "mykeys",
                                      "EMBARGO_MAIL_OUTBOX_DIR": "mail"}, cwd=here)
    monkeypatch.chdir(elsewhere)
    assert settings.keys_dir.is_relative_to(here)
    assert settings.outbox_dir.is_relative_to(here)


# -- S3 locations ----------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "bucket", "prefix"), [
    ("s3://bucket/prefix", "bucket", "prefix/"),
    ("s3://my-bucket/a/b/", "my-bucket", "a/b/"),
    ("s3://my.bucket.example", "my.bucket.example", ""),
    ("s3://abc/", "abc", ""),
])
def test_s3_location(tmp_path: Path, text: str, bucket: str, prefix: str) -> None:
    location = Location.parse(text, base=tmp_path)
    assert (location.kind, location.bucket, location.prefix) == ("s3", bucket, prefix)
    assert location.path is None
    assert str(location) == f"s3://{bucket}/{prefix}"


@pytest.mark.parametrize("text", ["s3://", "s3://ab/x", "s3://Bucket/x", "s3://under_score/x",
                                  "s3://-bucket/x", "https://bucket/x"])
def test_bad_s3_location(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError):
        Location.parse(text, base=tmp_path)


def test_s3_vault_from_settings(tmp_path: Path) -> None:
    settings = load_settings(environ={"EMBARGO_STORAGE_VAULT": "s3://embargo-vault/sealed/v1",
                                      "EMBARGO_STORAGE_PUBLIC": "s3://embargo-public"},
                             cwd=tmp_path)
    assert settings.vault == Location(kind="s3", bucket="embargo-vault", prefix="sealed/v1/")
    assert settings.public == Location(kind="s3", bucket="embargo-public", prefix="")


# -- secrets ------------------------------------------------------------------------------------
def test_secrets_are_masked(tmp_path: Path) -> None:
    settings = load_settings(environ={
        "EMBARGO_MAIL_SMTP_PASSWORD": "hunter2",
        "EMBARGO_DATABASE_URL": "postgresql+psycopg://embargo:s3cr3t-pw@db.internal/embargo",
    }, cwd=tmp_path)
    assert settings.mail.smtp_password == "hunter2"
    shown = settings.public_dict()
    assert shown["mail.smtp_password"] == "(set)"
    text = repr(shown)
    assert "hunter2" not in text
    assert "s3cr3t-pw" not in text
    assert "db.internal" in shown["(effective) database.url"]


def test_unset_secret_is_shown_empty(tmp_path: Path) -> None:
    shown = load_settings(environ={}, cwd=tmp_path).public_dict()
    assert shown["mail.smtp_password"] in ("", None)
    assert set(shown) >= {f.key for f in FIELDS}


def _check_types(settings: Settings) -> None:
    import dataclasses
    import types
    import typing

    from config.settings import SECTIONS

    for name, cls in SECTIONS.items():
        section = getattr(settings, name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            allowed = tuple(typing.get_origin(a) or a for a in allowed)  # tuple[str, ...]
            value = getattr(section, f.name)
            assert isinstance(value, allowed), (f"{name}.{f.name}", value, hint)
            assert not (isinstance(value, bool) and bool not in allowed)
            assert settings.values[f"{name}.{f.name}"] == value


def test_every_setting_is_a_typed_attribute_whatever_its_source(tmp_path: Path) -> None:
    assert not hasattr(Settings, "__getitem__")
    _check_types(load_settings(environ={}, cwd=tmp_path))
    # From the environment every value arrives as text; the attributes still
    # have their real types (3 as a float lease, "2525" as an int port).
    env = {"EMBARGO_SCHEDULER_LEASE_SECONDS": "3", "EMBARGO_MAIL_SMTP_PORT": "2525",
           "EMBARGO_COPIES_MAX_LEAD": "24h", "EMBARGO_MAIL_SMTP_USERNAME": "u"}
    settings = load_settings(environ=env, cwd=tmp_path)
    _check_types(settings)
    assert settings.scheduler.lease_seconds == 3.0
    assert settings.mail.smtp_port == 2525
    assert settings.copies.max_lead == timedelta(hours=24)


def test_fields_and_attributes_cannot_drift(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    import config.settings as module

    extra = module.Field(key="mail.colour", default="blue", check=module._text, help="x")
    monkeypatch.setattr(module, "FIELDS", (*module.FIELDS, extra))
    with pytest.raises(AssertionError, match=r"mail\.colour"):
        load_settings(environ={}, cwd=tmp_path)
