"""Every command's ``--json`` output is its view serialised, and validates
against the schema documented under docs/json/."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from jsonschema import Draft202012Validator, FormatChecker

from config.settings import Settings
from jobs.cli import main
from jobs.nodes import NodeMonitor
from release.copies import issue_copies
from release.service import ReleaseService, Services
from release.views import schemas
from tests.test_copies import QUEUED_AT, copies_in_outbox, pdf_bundle, queue, relay_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "json"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((DOCS / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FormatChecker())


def run_json(settings: Settings, capsys: pytest.CaptureFixture[str], *args: str,
             status: int = 0) -> Any:
    capsys.readouterr()
    returned = main(["--data-dir", str(settings.data_dir), *args, "--json"])
    out, err = capsys.readouterr()
    assert returned == status, err
    return json.loads(out)


@pytest.fixture
def busy(settings: Settings, services: Services) -> str:
    """A release whose copies went out, and a node that ran and stopped."""
    release = queue(services, pdf_bundle(settings.data_dir.parent / "b"))
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        issue_copies(services, release.id, actor="t")
        relay_for(services, settings).run_once()
    node = NodeMonitor(services, "node-1", max_skew=timedelta(milliseconds=500))
    node.start()
    node.stop()
    return str(release.id)


def test_the_documented_schemas_are_the_views_schemas() -> None:
    assert {p.name for p in DOCS.glob("*.schema.json")} == set(schemas())
    for name, schema in schemas().items():
        assert json.loads((DOCS / name).read_text()) == schema, (
            f"docs/json/{name} is stale: run python -m release.views docs/json")


def test_list_json(settings: Settings, busy: str, capsys: pytest.CaptureFixture[str]) -> None:
    listed = run_json(settings, capsys, "list")
    assert [r["id"] for r in listed] == [busy]
    check = validator("ReleaseSummary.schema.json")
    for item in listed:
        check.validate(item)
    assert len(listed[0]["documents"]) == 4


def test_show_json(settings: Settings, busy: str, capsys: pytest.CaptureFixture[str]) -> None:
    shown = run_json(settings, capsys, "show", busy)
    validator("ReleaseDetail.schema.json").validate(shown)
    assert len(shown["access_list"]) == 3 and all(a["sent_at"] for a in shown["access_list"])
    assert {n["purpose"] for n in shown["notices"]} == {"copy"}
    assert shown["events"][0]["action"] == "release_queued"


def test_access_list_json(settings: Settings, busy: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_json(settings, capsys, "access-list", busy)
    check = validator("AccessEntry.schema.json")
    for row in rows:
        check.validate(row)
    assert len(rows) == 3


def test_trace_json(settings: Settings, busy: str, capsys: pytest.CaptureFixture[str]) -> None:
    copy_id = str(copies_in_outbox(settings)[0]["X-Embargo-Copy-Id"])
    found = run_json(settings, capsys, "trace", copy_id)
    validator("TraceResult.schema.json").validate(found)
    assert (found["copy_id"], found["release_id"]) == (copy_id, busy)


def test_nodes_json(settings: Settings, busy: str, capsys: pytest.CaptureFixture[str]) -> None:
    nodes = run_json(settings, capsys, "nodes")
    check = validator("NodeStatus.schema.json")
    for node in nodes:
        check.validate(node)
    assert [(n["name"], n["state"]) for n in nodes] == [("node-1", "stopped")]


def test_config_show_json(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    shown = run_json(settings, capsys, "config", "show")
    validator("Settings.schema.json").validate(shown)


def test_counts_validate(services: Services, busy: str) -> None:
    from release.views import to_data

    counts = ReleaseService(services, actor="t").counts()
    validator("Counts.schema.json").validate(to_data(counts))
    assert (counts.queued, counts.active) == (1, 1)


def test_a_schema_catches_what_the_view_does_not_promise(
        settings: Settings, busy: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The schemas are strict: a renamed key or a local timestamp fails."""
    from jsonschema import ValidationError

    shown = run_json(settings, capsys, "show", busy)
    check = validator("ReleaseDetail.schema.json")
    renamed = {**shown, "instant_utc": shown["instant"]}
    del renamed["instant"]
    with pytest.raises(ValidationError):
        check.validate(renamed)
    with pytest.raises(ValidationError):
        check.validate({**shown, "instant": "2014-09-04T00:01:00+01:00"})


def test_no_orm_row_leaves_the_service() -> None:
    """Every public method of the service returns views (or plain values),
    never a database record."""
    import inspect
    import typing

    from release import records

    rows = {cls for cls in vars(records).values()
            if isinstance(cls, type) and issubclass(cls, records.Base) and cls is not records.Base}

    def mentions_row(hint: object) -> bool:
        return hint in rows or any(mentions_row(a) for a in typing.get_args(hint))

    public = [(name, fn) for name, fn in inspect.getmembers(ReleaseService, inspect.isfunction)
              if not name.startswith("_")]
    assert {"get", "list_releases", "access_list", "trace", "nodes", "counts", "queue",
            "cancel", "reschedule"} <= {name for name, _ in public}
    for name, fn in public:
        returned = typing.get_type_hints(fn)["return"]
        assert not mentions_row(returned), (name, returned)


@pytest.mark.parametrize("command", [("check",), ("keys", "check")])
def test_check_json(settings: Settings, busy: str, capsys: pytest.CaptureFixture[str],
                    command: tuple[str, ...]) -> None:
    findings = run_json(settings, capsys, *command)
    check = validator("Finding.schema.json")
    for finding in findings:
        check.validate(finding)
    assert findings and all(f["ok"] for f in findings), findings
    (settings.keys_dir / "publisher.pub").unlink()  # now a check fails, still as JSON
    failed = run_json(settings, capsys, *command, status=10)
    for finding in failed:
        check.validate(finding)
    assert not all(f["ok"] for f in failed)
