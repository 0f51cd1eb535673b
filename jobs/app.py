"""Wiring: build the engine, storage and clock once from the settings."""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from config.settings import Settings
from jobs.heartbeat import Heartbeat
from jobs.mail import mail_probe, transport_factory
from jobs.metrics import MetricsServer, database_ok, start_metrics
from jobs.nodes import NodeMonitor
from jobs.operations import Operations
from jobs.outage import DatabaseWatch, report
from jobs.relay import OutboxRelay
from jobs.scheduler import EmbargoScheduler
from release import approval
from release.clock import Clock
from release.context import Services
from release.copies import DocumentOpener
from release.keys import load_private_key
from release.publishing import Outcome, Publisher
from release.rehearsal import Rehearser
from storage import migrate
from storage.db import make_engine, new_sqlite_file
from storage.factory import make_public, make_s3_client, make_vault, needs_s3

log = logging.getLogger(__name__)


def build_services(settings: Settings, *, clock: Clock | None = None,
                   s3_client: Any = None, migrate_schema: bool = False) -> Services:
    """Everything the domain needs, from the settings. The schema is
    migrated only when ``migrate_schema`` is set (``db upgrade``, ``run``,
    ``demo``) or when the database is an SQLite file that does not exist yet;
    otherwise a database not at the latest schema raises SchemaError before
    anything is read or written."""
    created = new_sqlite_file(settings.database_url)
    engine = make_engine(settings.database_url)
    if migrate_schema or created:
        migrate.upgrade(engine)
    else:
        migrate.require_current(engine)
    if s3_client is None and needs_s3(settings):
        s3_client = make_s3_client(settings)
    services = Services(
        engine=engine,
        vault=make_vault(settings.vault, s3_client=s3_client),
        public=make_public(settings.public, settings, s3_client=s3_client),
        keys_dir=settings.keys_dir,
        clock=clock or Clock(timedelta(milliseconds=settings.testing.clock_offset_ms)),
        zone=settings.zone,
        default_at=settings.default_at,
        copies_max_lead=settings.copies.max_lead,
        copies_cutoff=settings.copies.cutoff,
        copies_unstampable=settings.copies.unstampable,
        alerts_to=settings.alerts.to,
        alerts_repeat=settings.alerts.repeat,
        approval_required=settings.approval.required,
    )
    return services


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class RunningNode:
    """One running scheduler node: its clock monitor and its scheduler."""

    name: str
    monitor: NodeMonitor
    scheduler: EmbargoScheduler
    watch: DatabaseWatch  # its ``fatal`` says why the node stopped itself, if it did
    operations: Operations | None = None
    metrics: MetricsServer | None = None
    heartbeat: Heartbeat | None = None

    def shutdown(self) -> None:
        for part in (self.heartbeat, self.operations):
            if part is not None:
                part.stop()
        self.scheduler.shutdown()
        self.monitor.stop()
        if self.metrics is not None:
            self.metrics.stop()


def start_node(settings: Settings, services: Services, stop: threading.Event,
               on_outcome: Callable[[Outcome], None] | None = None) -> RunningNode:
    """Start a scheduler node: check the clock, then schedule every active
    release, publish, issue copies and deliver notices until ``stop``."""
    private_key = load_private_key(settings.keys_dir)
    name = node_name()
    sched, mail = settings.scheduler, settings.mail
    lease = timedelta(seconds=sched.lease_seconds)
    max_skew = timedelta(milliseconds=sched.max_skew_ms)
    watch = DatabaseWatch(stop=stop)
    monitor = NodeMonitor(services, name, max_skew=max_skew,
                          skew_every=sched.skew_check_seconds, watch=watch)
    publisher = Publisher(services, private_key, claimant=name, lease=lease, stop=stop,
                          workers=sched.publish_workers,
                          clock_reading=lambda: monitor.reading, trusted_skew=max_skew)
    swept = services.public.sweep_staging()
    if swept:
        log.warning("removed %d decrypted leftover%s of a publisher that was killed, from %s",
                    swept, "s" if swept != 1 else "", services.public.staging.root)
    transports = transport_factory(settings)
    relay = OutboxRelay(services, transports(), sender=mail.sender,
                        worker=name, give_up_after=mail.give_up_after,
                        lease=lease,
                        opener=DocumentOpener(services, private_key),
                        workers=mail.workers, record_batch=mail.record_batch,
                        make_transport=transports, stop=stop)
    scheduler = EmbargoScheduler(
        services, publisher, relay, poll_seconds=sched.poll_seconds,
        workers=sched.workers,
        lead=timedelta(seconds=sched.lead_seconds), on_outcome=on_outcome,
        horizon=sched.horizon, staging_rate=sched.staging_mib_per_second * 2**20,
        guard=lambda: monitor.clock_ok, watch=watch)
    monitor.doing = scheduler.doing
    monitor.start()
    operations = start_operations(settings, services, private_key, name, monitor, scheduler,
                                  watch)
    # What the node made to start lives as long as it does: the collector need not
    # walk it again. A full collection over it took ~50 ms, and one that fell on an
    # instant held the documents up that long (bench/publish_latency.py, max 32.8 ms).
    gc.collect()
    gc.freeze()
    scheduler.start()

    def warn_unapproved() -> None:
        try:
            approval.warn_unapproved(services, now=services.clock.now(), actor=name,
                                     warn_before=settings.approval.warn_before)
        except Exception as exc:
            report(watch, exc, doing="warning of releases awaiting approval", logger=log)

    # Releases still awaiting approval: told at approval.warn_before and at the instant.
    scheduler.scheduler.add_job(warn_unapproved, "interval", id="warn-unapproved",
                                seconds=max(5.0, sched.poll_seconds),
                                next_run_time=services.clock.now(), name="warn unapproved")
    return RunningNode(name=name, monitor=monitor, scheduler=scheduler, watch=watch,
                       **operations)


def start_operations(settings: Settings, services: Services, private_key: X25519PrivateKey,
                     name: str, monitor: NodeMonitor, scheduler: EmbargoScheduler,
                     watch: DatabaseWatch) -> dict[str, Any]:
    """Rehearsals and alerts, metrics and health, the dead man's switch.
    Called before the scheduler starts, so that a release that went overdue
    while every node was down is alerted before this node publishes it."""
    rehearser = Rehearser(services, private_key, mail=mail_probe(settings),
                          min_nodes=settings.rehearsal.min_nodes,
                          mail_passed=settings.rehearsal.mail_passed, actor=name)
    operations = Operations(services, rehearser, node=name,
                            leads=settings.rehearsal.before,
                            overdue_after=settings.alerts.overdue_after,
                            clock_ok=lambda: monitor.clock_ok,
                            skew_ms=lambda: monitor.skew_ms, watch=watch)
    operations.start()
    metrics = start_metrics(settings.metrics.bind, services,
                            overdue_after=settings.alerts.overdue_after,
                            timers=scheduler.timers)
    heartbeat = None
    if settings.alerts.heartbeat_url:
        heartbeat = Heartbeat(settings.alerts.heartbeat_url,
                              every=settings.alerts.heartbeat_every, node=name,
                              healthy=lambda: monitor.clock_ok and database_ok(services))
        heartbeat.start()
    return {"operations": operations, "metrics": metrics, "heartbeat": heartbeat}
