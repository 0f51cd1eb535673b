"""Exactly once, under the interleavings a hostile review found (issue 12,
review): a node that was silent for a moment and is heard from again keeps
its claims for the rest of another relay's run; a relay whose run fails does
not leave its other workers sending with nobody renewing their claims; a
relay told to stop takes no new notice and finishes those on their way; a
notice first tried long after it was due (an owner's summary that waited for
the others, a relay that was down) is retried for mail.give_up_after from
that first try, not given up after one; a mail server that has taken a
message and is slow to say so is waited for, not sent the message again; a
5xx about the session (530 authentication required on MAIL FROM) rather
than about the message or its recipient is a setting to fix, retried, not
every notice failed for good; `resend --to` refuses an address the queue
would have refused; a claim that lapsed while its message was being built,
and that nobody took, is still this relay's to send; a notice resent and
refused again is alerted again; a cancellation while a copy is on its way
to the mail server tells that officer to delete it, and the copy that went
is recorded as sent."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select, update

from config.errors import DeliveryError, DeliveryRefused, InputError
from config.settings import Settings
from jobs import relay as relay_module
from jobs.mail import FileMailTransport, SmtpMailTransport
from jobs.nodes import server_time
from jobs.relay import OutboxRelay
from release.alerts import ALERT
from release.presenting import notice_state
from release.records import Node, OutboxMessage
from release.service import ReleaseService, Services
from tests.conftest import SEED_INSTANT, FakeClock, Inbox, free_port
from tests.test_notify import published  # noqa: F401 - a fixture


def undelivered(services: Services) -> list[OutboxMessage]:
    with services.sessions() as session:
        return list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.delivered_at.is_(None), OutboxMessage.purpose == "published")
            .order_by(OutboxMessage.id)))


def test_a_node_heard_from_again_keeps_the_claims_it_makes_after(
        published: Services, settings: Settings) -> None:  # noqa: F811
    """Node "a" was silent for longer than the lease when relay "b" started
    its run; a moment later it beats again and claims a notice. For the rest
    of b's run that claim stands: b does not send that notice too."""
    with published.sessions() as session, session.begin():
        now = server_time(session.connection())
        session.add(Node(name="a", started_at=now - timedelta(minutes=5),
                         heartbeat_at=now - timedelta(seconds=10), clock_ok=True))
    taken: list[int] = []

    class Hooked(FileMailTransport):
        def send(self, message: Message) -> str:
            if not taken:  # a recovers and claims the last of the notices
                last = undelivered(published)[-1]
                taken.append(last.id)
                with published.sessions() as session, session.begin():
                    now = server_time(session.connection())
                    session.execute(update(Node).where(Node.name == "a").values(
                        heartbeat_at=now))
                    session.execute(update(OutboxMessage).where(
                        OutboxMessage.id == last.id).values(
                        claimed_by="a#0001",
                        claim_expires_at=published.clock.now() + timedelta(seconds=3)))
            return super().send(message)

    relay = OutboxRelay(published, Hooked(settings.outbox_dir), sender="e@x.example",
                        worker="b", lease=timedelta(seconds=3))
    relay.run_once()
    with published.sessions() as session:
        row = session.get(OutboxMessage, taken[0])
        assert row is not None
        assert row.delivered_at is None and row.claimed_by == "a#0001"
    assert not FileMailTransport(settings.outbox_dir).path_of(row.message_id).exists()


def test_a_failed_run_returns_only_once_its_workers_are_done(
        published: Services, settings: Settings,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first worker's claim fails (the database went away for a moment)
    while another worker is handing a message over. run_once must not return
    (and stop renewing) while that worker still sends: its claim would lapse
    mid-send, and the next run, on this node or another, would send it too."""
    in_flight: list[str] = []
    release = threading.Event()

    class Slow(FileMailTransport):
        def send(self, message: Message) -> str:
            in_flight.append(str(message["Message-ID"]))
            try:
                if threading.current_thread() is not threading.main_thread():
                    release.wait(5)
                return super().send(message)
            finally:
                in_flight.remove(str(message["Message-ID"]))

    relay = OutboxRelay(published, Slow(settings.outbox_dir), sender="e@x.example",
                        worker="b", workers=2,
                        make_transport=lambda: Slow(settings.outbox_dir))
    claim = relay._claim
    calls: list[str] = []

    def flaky(*args: object, **kw: object) -> OutboxMessage | None:
        main = threading.current_thread() is threading.main_thread()
        calls.append("main" if main else "worker")
        if main and calls.count("main") == 2:
            while not in_flight:  # the other worker is handing its message over
                time.sleep(0.01)
            threading.Timer(0.5, release.set).start()
            raise OSError("connection to the database lost")
        return claim(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(relay, "_claim", flaky)
    with pytest.raises(OSError):
        relay.run_once()
    assert not in_flight, "run_once returned while a worker was still sending"
    release.set()


def test_a_relay_told_to_stop_takes_no_new_notice(
        published: Services, settings: Settings) -> None:  # noqa: F811
    stop = threading.Event()

    class Stopping(FileMailTransport):
        def send(self, message: Message) -> str:
            stop.set()  # SIGTERM while the first notice is on its way
            return super().send(message)

    before = len(undelivered(published))
    relay = OutboxRelay(published, Stopping(settings.outbox_dir), sender="e@x.example",
                        worker="b", stop=stop)
    assert relay.run_once() == 1  # the one on its way is finished and recorded
    left = undelivered(published)
    assert len(left) == before - 1 and all(r.claim_expires_at is None for r in left)
    assert relay.run_once() == 0
    assert Path(settings.outbox_dir).is_dir()


def test_a_notice_first_tried_late_is_retried_for_give_up_after_from_then(
        published: Services, settings: Settings) -> None:  # noqa: F811
    """The notices were due at the instant and first tried two hours later
    (every relay was down; or, for the owner's summary, the others took
    that long), with give_up_after one hour. The mail server greylists
    (451) the first try: that is one temporary failure, not an hour of them."""
    clock = published.clock
    assert isinstance(clock, FakeClock)

    class Greylisting(FileMailTransport):
        def send(self, message: Message) -> str:
            raise DeliveryError("smtp://mx answered: 451 4.7.1 greylisted, try later")

    first = SEED_INSTANT + timedelta(hours=2)
    clock.set(first)
    relay = OutboxRelay(published, Greylisting(settings.outbox_dir), sender="e@x.example",
                        worker="b", give_up_after=timedelta(hours=1))
    assert relay.run_once() == 0
    rows = undelivered(published)
    assert rows and all(r.given_up_at is None and r.attempts == 1 for r in rows)
    clock.set(first + timedelta(hours=1) - timedelta(microseconds=1))
    assert relay.run_once() == 0
    assert all(r.given_up_at is None and r.attempts == 2 for r in undelivered(published))
    with published.sessions() as session, session.begin():
        session.execute(update(OutboxMessage).values(next_attempt_at=first + timedelta(hours=1)))
    clock.set(first + timedelta(hours=1))  # an hour after the first try: given up
    assert relay.run_once() == 0
    assert all(r.given_up_at is not None and r.attempts == 3 for r in undelivered(published))


class SlowToAnswer(Inbox):
    """Takes the message at the end of DATA, then takes ``delay`` seconds
    to say 250 (content scanning, a loaded queue)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        taken = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(self.delay)
        return taken


def test_a_server_slow_to_acknowledge_data_is_waited_for_not_sent_twice() -> None:
    """RFC 5321 (4.5.3.2.6) gives the reply to the end of DATA ten minutes:
    a client that gives up sooner and tries again makes a second copy of a
    message the server already has. The short timeout is for reaching the
    server; the reply to the message gets the long one."""
    port = free_port()
    inbox = SlowToAnswer(1.0)
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    message = Message()
    message["From"], message["To"] = "e@x.example", "officer@force.example"
    message["Subject"], message["Message-ID"] = "Published", "<slow.1@embargo.invalid>"
    message.set_payload("published")
    transport = SmtpMailTransport("127.0.0.1", port, security="none", timeout=0.3)
    try:
        assert transport.send(message) == f"smtp://127.0.0.1:{port}"
        transport.close()
    finally:
        controller.stop()
    assert len(inbox.messages) == 1


class Answering(Inbox):
    """Answers MAIL FROM with ``mail`` and the end of DATA with ``data``."""

    def __init__(self, mail: str, data: str = "250 OK") -> None:
        super().__init__()
        self.mail, self.data = mail, data

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: Any) -> str:
        if self.mail.startswith("250"):
            envelope.mail_from = address
        return self.mail

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return self.data


@pytest.mark.parametrize(("mail", "data", "refused"), [
    ("530 5.7.0 Authentication required", "250 OK", False),  # the session: a setting
    ("550 5.7.1 Sender address rejected: not owned by user", "250 OK", False),
    ("451 4.3.0 try again later", "250 OK", False),
    ("552 5.3.4 Message size exceeds fixed limit", "250 OK", True),  # this message
    ("250 OK", "554 5.6.0 Message content rejected", True),
    ("250 OK", "552 5.3.4 Message too big", True),
])
def test_a_5xx_about_the_session_is_temporary_one_about_the_message_permanent(
        mail: str, data: str, refused: bool) -> None:
    port = free_port()
    controller = Controller(Answering(mail, data), hostname="127.0.0.1", port=port)
    controller.start()
    message = Message()
    message["From"], message["To"] = "e@x.example", "officer@force.example"
    message["Subject"], message["Message-ID"] = "Published", "<s.1@embargo.invalid>"
    message.set_payload("published")
    transport = SmtpMailTransport("127.0.0.1", port, security="none", timeout=2)
    try:
        with pytest.raises(DeliveryError) as caught:
            transport.send(message)
    finally:
        transport.close()
        controller.stop()
    assert isinstance(caught.value, DeliveryRefused) is refused, caught.value
    assert mail.split()[0] in str(caught.value) or data.split()[0] in str(caught.value)


@pytest.mark.parametrize("to", ["jöns@force.example",  # no SMTPUTF8: "cannot be reached"
                                "liaison@force.example\x07", "(x)@force.example",
                                "liaison@force..example"])
def test_resend_to_refuses_an_address_the_queue_would_refuse(
        published: Services, to: str) -> None:  # noqa: F811
    row = undelivered(published)[0]
    with published.sessions() as session, session.begin():
        session.execute(update(OutboxMessage).where(OutboxMessage.id == row.id).values(
            given_up_at=published.clock.now(), last_error="550 no such user"))
    service = ReleaseService(published, actor="comms")
    with pytest.raises(InputError):
        service.resend(str(row.id), to=to)
    assert [r.to for r in service.resend(str(row.id), to="fixed@force.example")] \
        == ["fixed@force.example"]


def test_a_lapsed_claim_nobody_took_is_still_sent_by_its_holder(
        published: Services, settings: Settings,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the first message took longer than the lease (a large PDF
    to stamp, a stalled disk): the claim lapsed, but no other relay took
    it, so it is still this relay's. It was skipped as "left to its new
    holder" that did not exist, and held by the renewer for the rest of
    the run."""
    clock = published.clock
    assert isinstance(clock, FakeClock)
    compose = relay_module.compose
    slow: list[str] = []

    def slow_compose(row: OutboxMessage, *args: object, **kw: object) -> Message:
        if not slow:
            slow.append(row.message_id)
            clock.set(clock.now() + timedelta(seconds=4))  # the lease is 3 s
        return compose(row, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(relay_module, "compose", slow_compose)
    before = len(undelivered(published))
    relay = OutboxRelay(published, FileMailTransport(settings.outbox_dir),
                        sender="e@x.example", worker="b", lease=timedelta(seconds=3))
    assert relay.run_once() >= before
    assert not undelivered(published)
    assert FileMailTransport(settings.outbox_dir).path_of(slow[0]).exists()


def test_a_notice_resent_and_refused_again_is_alerted_again(
        published: Services, settings: Settings) -> None:  # noqa: F811
    """The owner resends a refused notice (the address was "fixed", but
    not yet at the mail server) and it is refused again: the owner hears
    of that failure too, not only of the first."""
    first = undelivered(published)[0]
    bad = first.to_addr

    class Refusing(FileMailTransport):
        def send(self, message: Message) -> str:
            if str(message["To"]).endswith(f"<{bad}>") or str(message["To"]) == bad:
                raise DeliveryRefused(f"smtp://mx refused the recipient: 550 {bad}: no such user")
            return super().send(message)

    relay = OutboxRelay(published, Refusing(settings.outbox_dir), sender="e@x.example",
                        worker="b")

    def alerts() -> list[OutboxMessage]:
        with published.sessions() as session:
            return list(session.scalars(select(OutboxMessage).where(
                OutboxMessage.purpose == ALERT)))

    relay.run_once()
    assert len(alerts()) == 1
    service = ReleaseService(published, actor="comms")
    for round_ in (2, 3):
        (row,) = service.resend(str(first.id))
        relay.run_once()
        with published.sessions() as session:
            again = session.get(OutboxMessage, row.number)
            assert again is not None and again.failed_at is not None
        assert len(alerts()) == round_, [a.details for a in alerts()]


def test_a_cancel_while_a_copy_is_on_its_way_withdraws_it_and_records_it(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """The relay has checked its claim and is handing officer 1's copy to
    the mail server when comms cancel the release. The copy reaches the
    officer: they must get the withdrawal notice, and the copy must be
    audited and on the access list as sent, not "never received"."""
    import dataclasses
    import json

    from release.copies import DocumentOpener, issue_copies
    from release.keys import load_private_key
    from release.records import AuditEvent, Copy
    from tests.conftest import write_bundle
    from tests.test_copies import QUEUED_AT, queue

    release = queue(services, write_bundle(tmp_path / "b", letters=2))
    now_services = dataclasses.replace(
        services, clock=FakeClock(QUEUED_AT + timedelta(minutes=1)))
    assert issue_copies(now_services, release.id, actor="t") == 2
    service = ReleaseService(now_services, actor="comms")
    on_its_way: list[str] = []

    class Cancelled(FileMailTransport):
        def send(self, message: Message) -> str:
            if not on_its_way:
                on_its_way.append(str(message["To"]))
                service.cancel(release.id, reason="withdrawn while copies went")
            return super().send(message)

    relay = OutboxRelay(now_services, Cancelled(settings.outbox_dir), sender="e@x.example",
                        worker="b",
                        opener=DocumentOpener(now_services, load_private_key(settings.keys_dir)))
    relay.run_once()
    assert len(on_its_way) == 1
    with services.sessions() as session:
        withdrawn = [r.to_addr for r in session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == "withdrawn"))]
        sent = [json.loads(e.details) for e in session.scalars(select(AuditEvent).where(
            AuditEvent.action == "copy_sent"))]
        copies = {c.recipient_id: c.sent_at for c in session.scalars(select(Copy))}
    assert [w for w in withdrawn if w in on_its_way[0]] == withdrawn and len(withdrawn) == 1
    assert len(sent) == 1 and sent[0]["to"] in on_its_way[0]
    assert sorted(at is not None for at in copies.values()) == [False, True]
    with services.sessions() as session:
        states = {r.to_addr: notice_state(r) for r in session.scalars(select(OutboxMessage)
                  .where(OutboxMessage.purpose == "copy"))}
    assert sorted(states.values()) == ["delivered", "given up"]
    assert next(a for a, s in states.items() if s == "delivered") in on_its_way[0]
