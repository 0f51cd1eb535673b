"""Alerts through the outbox: to the owner and ``alerts.to``, each once."""

from __future__ import annotations

import dataclasses
from email import message_from_bytes
from pathlib import Path

import pytest
from sqlalchemy import select

from config.errors import ConfigError
from config.settings import load_settings
from jobs.mail import FileMailTransport
from jobs.relay import OutboxRelay
from release.alerts import ALERT, Alert, raise_alert
from release.records import AuditEvent, OutboxMessage
from release.service import Services
from storage.db import transaction
from tests.conftest import SEED_INSTANT, FakeClock
from tests.test_publish import queue_seed


def test_alerts_to_takes_a_list_or_comma_separated_text(data_dir: Path) -> None:
    from_env = load_settings(environ={"EMBARGO_ALERTS_TO": "ops@x.example, duty@x.example"},
                             overrides={"data_dir": str(data_dir)})
    assert from_env.alerts.to == ("ops@x.example", "duty@x.example")
    config = data_dir / "embargo.toml"
    config.write_text('[alerts]\nto = ["ops@x.example"]\nrepeat = "5m"\n')
    from_file = load_settings(config_file=config, environ={})
    assert from_file.alerts.to == ("ops@x.example",)
    assert from_file.alerts.repeat.total_seconds() == 300
    with pytest.raises(ConfigError, match=r"alerts\.to .*'not an address' is not an email"):
        load_settings(environ={"EMBARGO_ALERTS_TO": "not an address"})


def test_an_alert_goes_to_the_owner_and_alerts_to_once(services: Services, bundle: Path,
                                                      tmp_path: Path) -> None:
    release = queue_seed(services, bundle)
    at = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT),
                             alerts_to=("duty@inspectorate.example",
                                        "PRESS@inspectorate.example"))
    alert = Alert(kind="publication_failed", subject="Release at risk: a document is damaged",
                  lines=["letters/force-2.txt could not be opened.", "Nothing is public."],
                  key="1")
    with transaction(at.sessions) as session:
        added = raise_alert(session, alert, release_id=release.id, owner=release.owner,
                            alerts_to=at.alerts_to, now=SEED_INSTANT, actor="node-1")
    assert added == 2  # the owner once, although alerts.to names them too (other case)
    with transaction(at.sessions) as session:  # the same alert again: nothing more
        assert raise_alert(session, alert, release_id=release.id, owner=release.owner,
                           alerts_to=at.alerts_to, now=SEED_INSTANT, actor="node-2") == 0
    with transaction(at.sessions) as session:  # the next occurrence is a new alert
        assert raise_alert(session, dataclasses.replace(alert, key="2"),
                           release_id=release.id, owner=release.owner,
                           alerts_to=at.alerts_to, now=SEED_INSTANT, actor="node-1") == 2
    with at.sessions() as session:
        rows = list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == ALERT)))
        events = list(session.scalars(select(AuditEvent).where(
            AuditEvent.action == "alert_raised")))
    assert sorted(r.to_addr for r in rows) == sorted(["press@inspectorate.example",
                                                      "duty@inspectorate.example"] * 2)
    assert len({r.message_id for r in rows}) == 4
    assert len(events) == 2
    outbox = tmp_path / "outbox"
    relay = OutboxRelay(at, FileMailTransport(outbox), sender="Embargo <e@x.example>",
                        worker="relay")
    assert relay.run_once() == 4
    messages = [message_from_bytes(p.read_bytes()) for p in sorted(outbox.glob("*.eml"))]
    assert len(messages) == 4
    first = messages[0]
    assert first["Subject"] == "Release at risk: a document is damaged"
    body = first.get_payload()[0].get_payload(decode=True).decode()
    assert "letters/force-2.txt could not be opened." in body
    assert release.id in body


def test_an_alert_subject_is_one_line() -> None:
    with pytest.raises(ValueError, match="one line"):
        Alert(kind="overdue", subject="at risk\r\nBcc: everyone@x.example", lines=[])
