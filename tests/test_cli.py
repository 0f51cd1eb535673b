"""The real `embargo` command, run in subprocesses against a temporary data
dir. The CLI reads the real clock, so releases here are in 2099."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from config.settings import load_settings
from jobs.app import build_services
from release import keys as keyfile
from release.records import CANCELLED, QUEUED, Release
from release.service import dek_key
from tests.conftest import release_row, write_bundle

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "embargo"
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
RELEASE_ID = re.compile(r"rel_[0-9a-f]{16}")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def embargo(data_dir: Path, *args: str, env: dict[str, str] | None = None,
            script: bool = False) -> subprocess.CompletedProcess[str]:
    command = [str(CONSOLE_SCRIPT)] if script and CONSOLE_SCRIPT.exists() else [
        sys.executable, "-m", "jobs.cli"]
    return subprocess.run([*command, "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, env=env or clean_env(),
                          cwd=data_dir.parent, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def release_count(data_dir: Path) -> int:
    db = data_dir / "embargo.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master")}
        if "releases" not in tables:
            return 0
        return int(conn.execute("select count(*) from releases").fetchone()[0])


def vault_files(data_dir: Path) -> list[Path]:
    root = data_dir / "vault"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def load(data_dir: Path, release_id: str) -> Release:
    services = build_services(load_settings(environ={}, overrides={"data_dir": str(data_dir)}))
    try:
        return release_row(services, release_id)
    finally:
        services.engine.dispose()


# -- the happy path: one data dir for the module --------------------------------------
@dataclass
class Workspace:
    data_dir: Path
    summer: str  # a release at 00:01 BST
    winter: str  # a release at 00:01 GMT
    summer_bundle: Path


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    base = tmp_path_factory.mktemp("cli")
    data_dir = base / "var"
    init = embargo(data_dir, "keys", "init", script=True)
    assert init.returncode == 0, init.stderr
    summer_bundle = write_bundle(base / "summer", publish_on="2099-07-01")
    ids = []
    for manifest in (summer_bundle, write_bundle(base / "winter", publish_on="2099-01-01")):
        proc = embargo(data_dir, "queue", str(manifest))
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert RELEASE_ID.fullmatch(proc.stdout.strip()), proc.stdout
        ids.append(proc.stdout.strip())
    yield Workspace(data_dir=data_dir, summer=ids[0], winter=ids[1],
                    summer_bundle=summer_bundle)


def test_keys_init_makes_a_private_key_only_the_owner_can_read(ws: Workspace) -> None:
    private = ws.data_dir / "keys" / keyfile.PRIVATE_NAME
    public = ws.data_dir / "keys" / keyfile.PUBLIC_NAME
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert keyfile.load_private_key(ws.data_dir / "keys") is not None
    before = private.read_bytes()
    again = embargo(ws.data_dir, "keys", "init")
    assert_one_line_error(again, "already exists")
    assert private.read_bytes() == before


def test_queue_prints_the_id_and_records_the_release(ws: Workspace) -> None:
    release = load(ws.data_dir, ws.summer)
    assert release.state == QUEUED
    assert release.instant == datetime(2099, 6, 30, 23, 1, tzinfo=UTC)
    assert len(release.documents) == 4 and len(release.recipients) == 3
    assert load(ws.data_dir, ws.winter).instant == datetime(2099, 1, 1, 0, 1, tzinfo=UTC)


def test_list_shows_both_clocks(ws: Workspace) -> None:
    proc = embargo(ws.data_dir, "list")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()
            if RELEASE_ID.match(line)}
    assert set(rows) >= {ws.summer, ws.winter}
    assert "00:01 BST" in rows[ws.summer] and "23:01 UTC" in rows[ws.summer]
    assert "00:01 GMT" in rows[ws.winter] and "00:01 UTC" in rows[ws.winter]
    # wall-clock day and UTC day both shown for the summer one
    assert "1 Jul 2099" in rows[ws.summer] and "30 Jun" in rows[ws.summer]


def test_show_json_has_the_ids(ws: Workspace) -> None:
    proc = embargo(ws.data_dir, "show", ws.summer, "--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    release = load(ws.data_dir, ws.summer)
    assert facts["id"] == ws.summer
    assert facts["instant"] == "2099-06-30T23:01:00Z"
    assert "BST" in facts["embargo"] and "UTC" in facts["embargo"]
    assert [d["id"] for d in facts["documents"]] == [d.id for d in release.documents]
    folder = ws.summer_bundle.parent
    assert [d["filename"] for d in facts["documents"]] == [
        "national-report.txt", "force-1.txt", "force-2.txt", "force-3.txt"]
    report = (folder / "national-report.txt").read_bytes()
    assert facts["documents"][0]["size"] == len(report)
    assert facts["documents"][0]["sha256"] == hashlib.sha256(report).hexdigest()
    assert [r["email"] for r in facts["recipients"]] == [
        f"liaison{i}@force{i}.police.example" for i in (1, 2, 3)]
    assert "release_queued" in [e["action"] for e in facts["events"]]


def test_list_json_has_release_and_document_ids(ws: Workspace) -> None:
    proc = embargo(ws.data_dir, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {r["id"]: r for r in json.loads(proc.stdout)}
    assert set(listed) >= {ws.summer, ws.winter}
    assert listed[ws.summer]["instant"] == "2099-06-30T23:01:00Z"
    release = load(ws.data_dir, ws.summer)
    assert "documents" in listed[ws.summer], "list --json must include each document's id"
    assert [d["id"] for d in listed[ws.summer]["documents"]] == [
        d.id for d in release.documents]


def test_reschedule(ws: Workspace) -> None:
    proc = embargo(ws.data_dir, "reschedule", ws.winter, "--publish-on", "2099-02-01",
                   "--at", "09:30")
    assert proc.returncode == 0, proc.stderr
    assert "09:30 GMT" in proc.stdout and "09:30 UTC" in proc.stdout
    assert load(ws.data_dir, ws.winter).instant == datetime(2099, 2, 1, 9, 30, tzinfo=UTC)
    past = embargo(ws.data_dir, "reschedule", ws.winter, "--publish-on", "2001-02-01")
    assert_one_line_error(past, "past")
    assert load(ws.data_dir, ws.winter).instant == datetime(2099, 2, 1, 9, 30, tzinfo=UTC)


def test_cancel_then_cancel_again(ws: Workspace) -> None:
    assert (ws.data_dir / "vault" / dek_key(ws.summer)).is_file()
    proc = embargo(ws.data_dir, "cancel", ws.summer, "--reason", "withdrawn")
    assert proc.returncode == 0, proc.stderr
    assert ws.summer in proc.stdout
    assert not (ws.data_dir / "vault" / dek_key(ws.summer)).exists()
    release = load(ws.data_dir, ws.summer)
    assert (release.state, release.reason) == (CANCELLED, "withdrawn")
    again = embargo(ws.data_dir, "cancel", ws.summer, "--reason", "again")
    assert_one_line_error(again, "cancelled")


def test_audit_verify(ws: Workspace) -> None:
    proc = embargo(ws.data_dir, "audit", "verify")
    assert proc.returncode == 0, proc.stderr
    assert "intact" in proc.stdout


def test_config_show_prints_no_secret(ws: Workspace) -> None:
    env = clean_env(EMBARGO_MAIL_SMTP_PASSWORD="hunter2",
                    EMBARGO_DATABASE_URL="postgresql+psycopg://embargo:hunter3@db.example/e")
    for args in (("config", "show"), ("config", "show", "--json")):
        proc = embargo(ws.data_dir, *args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "mail.smtp_password" in proc.stdout
        assert "hunter2" not in proc.stdout + proc.stderr
        assert "hunter3" not in proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["data_dir"] == str(ws.data_dir)
    assert shown["mail.smtp_password"] == "(set)"


# -- bad input: one line, non-zero, nothing left behind ----------------------------------
Case = Callable[[Path, Path], list[str]]


def _replace(manifest: Path, old: str, new: str) -> None:
    text = manifest.read_text()
    assert old in text
    manifest.write_text(text.replace(old, new, 1))


def _missing_file(folder: Path, manifest: Path) -> list[str]:
    (folder / "letters" / "force-2.txt").unlink()
    return []


def _same_name(folder: Path, manifest: Path) -> list[str]:
    (folder / "copy").mkdir()
    (folder / "copy" / "force-1.txt").write_text("again\n")
    manifest.write_text(manifest.read_text() + '\n[[documents]]\npath = "copy/force-1.txt"\n'
                        'kind = "letter"\norganisation = "Force 1"\n')
    return []


def _bad_email(folder: Path, manifest: Path) -> list[str]:
    _replace(manifest, "liaison2@force2.police.example", "liaison2.force2.police.example")
    return []


def _empty_title(folder: Path, manifest: Path) -> list[str]:
    _replace(manifest, 'title = "Core business: a test inspection"', 'title = ""')
    return []


def _unknown_key(folder: Path, manifest: Path) -> list[str]:
    _replace(manifest, 'owner = "press', 'embargo_level = "high"\nowner = "press')
    return []


def _args(*args: str) -> Case:
    return lambda folder, manifest: list(args)


SATURDAY = f"{WEEKDAYS[(date(2099, 9, 4).weekday() + 2) % 7]} 4 September 2099"

BAD_INPUT: dict[str, tuple[Case, tuple[str, ...]]] = {
    "missing file": (_missing_file, ("force-2.txt", "does not exist")),
    "same name": (_same_name, ("force-1.txt", "two documents")),
    "invalid email": (_bad_email, ("liaison2.force2.police.example", "email")),
    "empty title": (_empty_title, ("title", "empty")),
    "unknown key": (_unknown_key, ("embargo_level", "unknown")),
    "gap": (_args("--publish-on", "2027-03-28", "--at", "01:30"),
            ("does not exist", "00:30 UTC", "01:30 UTC")),
    "fold": (_args("--publish-on", "2027-10-31", "--at", "01:30"),
             ("happens twice", "00:30 UTC", "01:30 UTC")),
    "past": (_args("--publish-on", "2014-09-04"), ("past",)),
    "weekday": (_args("--publish-on", SATURDAY),
                (WEEKDAYS[date(2099, 9, 4).weekday()], SATURDAY.split()[0])),
    "bad zone": (_args("--zone", "Europe/Lundon"), ("Europe/Lundon", "time zone")),
    "bad time": (_args("--at", "24:01"), ("24:01",)),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(tmp_path: Path, case: str) -> None:
    make, needles = BAD_INPUT[case]
    data_dir = tmp_path / "var"
    keyfile.init_keys(data_dir / "keys")
    folder = tmp_path / "bundle"
    manifest = write_bundle(folder, publish_on="2099-01-01")
    extra = make(folder, manifest)
    proc = embargo(data_dir, "queue", str(manifest), *extra)
    assert_one_line_error(proc, *needles)
    assert proc.stdout == ""
    assert release_count(data_dir) == 0
    assert vault_files(data_dir) == []


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read a mode-000 file")
    data_dir = tmp_path / "var"
    keyfile.init_keys(data_dir / "keys")
    manifest = write_bundle(tmp_path / "bundle", publish_on="2099-01-01")
    target = tmp_path / "bundle" / "letters" / "force-1.txt"
    target.chmod(0)
    try:
        proc = embargo(data_dir, "queue", str(manifest))
    finally:
        target.chmod(0o644)
    assert_one_line_error(proc, "force-1.txt", "readable")
    assert release_count(data_dir) == 0
    assert vault_files(data_dir) == []


def test_no_keys_says_which_command_to_run(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    manifest = write_bundle(tmp_path / "bundle", publish_on="2099-01-01")
    proc = embargo(data_dir, "queue", str(manifest))
    assert_one_line_error(proc, "embargo keys init")
    assert release_count(data_dir) == 0
    assert vault_files(data_dir) == []


def test_letter_without_recipient_warns_but_queues(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    keyfile.init_keys(data_dir / "keys")
    manifest = write_bundle(tmp_path / "bundle", publish_on="2099-01-01")
    text = manifest.read_text()
    cut = text.rindex("[[recipients]]")
    manifest.write_text(text[:cut])  # Force 3 loses its liaison officer
    proc = embargo(data_dir, "queue", str(manifest))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "force-3.txt" in warnings[0] and "Force 3" in warnings[0]
    release = load(data_dir, proc.stdout.strip())
    assert len(release.documents) == 4 and len(release.recipients) == 2


def test_name_with_path_parts_is_stored_as_its_last_part(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    keyfile.init_keys(data_dir / "keys")
    manifest = write_bundle(tmp_path / "bundle", publish_on="2099-01-01")
    _replace(manifest, 'path = "letters/force-1.txt"',
             'path = "letters/force-1.txt"\nname = "../../x.txt"')
    proc = embargo(data_dir, "queue", str(manifest))
    assert proc.returncode == 0, proc.stderr
    release = load(data_dir, proc.stdout.strip())
    assert [d.filename for d in release.documents][:2] == ["national-report.txt", "x.txt"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only_for_big_files() -> None:
    from jobs.console import SealingProgress

    screen = _Terminal()
    with SealingProgress(stream=screen, min_size=1 << 20) as bar:
        bar("small.pdf", 100, 100)
        total = 4 << 20
        for done in range(0, total + 1, 1 << 20):
            bar("national-report.pdf", done, total)
    drawn = screen.getvalue()
    assert "sealing national-report.pdf" in drawn and "small.pdf" not in drawn
    assert "4.2/4.2 MB" in drawn  # rich counts in SI units: 4 MiB
    piped = io.StringIO()
    with SealingProgress(stream=piped, min_size=0) as bar:
        bar("national-report.pdf", 1, 1)
    assert piped.getvalue() == ""


def _schema_snapshot(db: Path) -> tuple[str, list[tuple[str, str]]]:
    with sqlite3.connect(db) as conn:
        version = conn.execute("select version_num from alembic_version").fetchone()[0]
        return version, sorted(conn.execute("select name, sql from sqlite_master"))


@pytest.mark.parametrize("command", [("list",), ("show", "rel_0000000000000000"),
                                     ("queue", "MANIFEST"), ("check",)])
def test_a_command_on_an_old_schema_refuses_and_changes_nothing(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    from storage import migrate
    from storage.db import make_engine

    data_dir = tmp_path / "var"
    assert embargo(data_dir, "keys", "init").returncode == 0
    engine = make_engine(f"sqlite:///{data_dir / 'embargo.db'}")
    migrate.upgrade(engine, "0002")
    engine.dispose()
    before = _schema_snapshot(data_dir / "embargo.db")
    manifest = write_bundle(tmp_path / "bundle", publish_on="2099-07-01")
    args = [str(manifest) if a == "MANIFEST" else a for a in command]
    proc = embargo(data_dir, *args)
    line = assert_one_line_error(proc, "schema is at 0002", f"needs {migrate.head()}",
                                 "run `embargo db upgrade`")
    assert proc.returncode == 9, line
    assert _schema_snapshot(data_dir / "embargo.db") == before
    assert vault_files(data_dir) == []
    # Upgrading on request makes the same command work.
    assert embargo(data_dir, "db", "upgrade").returncode == 0
    if command[0] in ("list", "queue"):
        assert embargo(data_dir, *args).returncode == 0


def test_a_command_on_an_empty_existing_database_refuses(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    sqlite3.connect(data_dir / "embargo.db").close()  # an empty file someone made
    proc = embargo(data_dir, "list")
    assert_one_line_error(proc, "has no Embargo schema", "run `embargo db upgrade`")
    with sqlite3.connect(data_dir / "embargo.db") as conn:
        assert list(conn.execute("select name from sqlite_master")) == []


def test_the_first_command_creates_a_missing_sqlite_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    assert embargo(data_dir, "keys", "init").returncode == 0
    assert not (data_dir / "embargo.db").exists()
    proc = embargo(data_dir, "queue", str(write_bundle(tmp_path / "b", publish_on="2099-07-01")))
    assert proc.returncode == 0, proc.stderr
    assert release_count(data_dir) == 1


def test_the_error_tree_maps_once_to_exit_statuses_hints_and_http() -> None:
    import config.errors as errors
    from jobs.cli import EXIT_STATUS, hint_for

    missing = errors.ReleaseNotFoundError("rel_nope")
    assert "embargo" not in str(missing)  # the domain's words: facts, no command
    assert errors.status_for(missing, EXIT_STATUS) == 3
    assert hint_for(missing) == " (see `embargo list`)"
    assert errors.status_for(missing, errors.HTTP_STATUS) == 404
    assert errors.status_for(errors.AmbiguousIdError("rel_"), errors.HTTP_STATUS) == 422
    assert errors.status_for(errors.StateError("published"), errors.HTTP_STATUS) == 409
    schema = errors.SchemaError(current="0002", needed="0003")
    assert (errors.status_for(schema, EXIT_STATUS), errors.status_for(schema, errors.HTTP_STATUS)
            ) == (9, 500)
    # Every class of the tree has a status in both tables.
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.EmbargoError):
            error = cls.__new__(cls)
            assert errors.status_for(error, EXIT_STATUS) >= 1
            assert errors.status_for(error, errors.HTTP_STATUS) >= 400


def test_an_unknown_release_is_one_line_with_the_hint(ws: Workspace) -> None:
    proc = embargo(ws.data_dir, "show", "rel_nope")
    assert_one_line_error(proc, "no release 'rel_nope' (see `embargo list`)")
    assert proc.returncode == 3


def test_tables_are_drawn_on_a_terminal_and_plain_when_piped() -> None:
    from jobs.console import print_table, table

    rows, headers = [("rel_1", "Report", "queued")], ["id", "title", "state"]
    piped = io.StringIO()
    print_table(rows, headers, out=piped, title="releases")
    assert piped.getvalue() == "releases\n" + table(rows, headers) + "\n"
    screen = _Terminal()
    print_table(rows, headers, out=screen, title="releases")
    assert "┃" in screen.getvalue() and "rel_1" in screen.getvalue()
