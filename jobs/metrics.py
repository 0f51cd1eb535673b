"""Health and Prometheus metrics of a node, on ``metrics.bind``:
``/healthz/live`` (the process answers), ``/healthz/ready`` (database, vault,
public location and key usable; JSON naming what failed) and ``/metrics``.

The figures come from the database when scraped (so every node shows the
same releases, and a restart loses nothing); ``embargo_releases_unscheduled``
is this node's own: releases due within a minute that it holds no timer for
(``min`` across nodes is the ones *no* node holds)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from config.errors import ConfigError
from release.context import Services
from release.keys import PUBLIC_NAME, load_private_key, load_public_key
from release.records import (
    AWAITING_APPROVAL,
    CANCELLED,
    DRAFT,
    FAILED,
    PUBLISHED,
    PUBLISHING,
    QUEUED,
    Document,
    Node,
    OutboxMessage,
    Rehearsal,
    Release,
)
from storage.db import transaction

log = logging.getLogger(__name__)

STATES = (DRAFT, AWAITING_APPROVAL, QUEUED, PUBLISHING, PUBLISHED, FAILED, CANCELLED)
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 3600.0)
UNSCHEDULED_WITHIN = timedelta(minutes=1)
LIVE = timedelta(seconds=10)


class EmbargoCollector(Collector):
    """Reads the figures from the database at each scrape. ``timers`` gives
    the releases this node's scheduler holds a timer for (None: no scheduler
    here, no unscheduled figure)."""

    def __init__(self, services: Services, *, overdue_after: timedelta,
                 timers: Callable[[], set[str]] | None = None) -> None:
        self.s = services
        self.overdue_after = overdue_after
        self.timers = timers

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("embargo_database_up",
                               "1 when the figures below could be read from the database")
        try:
            metrics = self._read(self.s.clock.now())
        except Exception as exc:
            log.warning("metrics: cannot read the database: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics

    def _read(self, now: datetime) -> list[Metric]:
        out: list[Metric] = []
        with transaction(self.s.sessions) as session:
            counts = dict(session.execute(select(Release.state, func.count())
                                          .group_by(Release.state)).all())
            states = GaugeMetricFamily("embargo_releases", "Releases by state",
                                       labels=["state"])
            for state in STATES:
                states.add_metric([state], counts.get(state, 0))
            out.append(states)

            upcoming = list(session.execute(select(Release.id, Release.instant).where(
                Release.state == QUEUED, Release.instant > now).order_by(Release.instant)))
            nxt = GaugeMetricFamily("embargo_next_embargo_seconds",
                                    "Seconds until the next queued release's instant")
            if upcoming:
                nxt.add_metric([], (upcoming[0][1] - now).total_seconds())
            out.append(nxt)

            overdue = session.scalar(select(func.count()).where(
                Release.state.in_((QUEUED, PUBLISHING)),
                Release.instant <= now - self.overdue_after)) or 0
            out.append(GaugeMetricFamily(
                "embargo_releases_overdue", "Releases not published although their instant "
                "passed alerts.overdue_after ago", value=overdue))

            if self.timers is not None:
                soon = set(session.scalars(select(Release.id).where(
                    Release.state == QUEUED, Release.instant <= now + UNSCHEDULED_WITHIN)))
                out.append(GaugeMetricFamily(
                    "embargo_releases_unscheduled", "Releases due within a minute (or past "
                    "due) that this node holds no timer for", value=len(soon - self.timers())))

            out.append(self._lateness(session))
            published = session.scalar(select(func.count()).select_from(Document).where(
                Document.published_at.is_not(None))) or 0
            out.append(CounterMetricFamily("embargo_documents_published",
                                           "Documents published", value=published))
            out.extend(self._outbox(session, now))
            out.append(self._skew(session, now))
            out.append(self._rehearsals(session, [r[0] for r in upcoming]))
        return out

    def _lateness(self, session: Any) -> Metric:
        late = Release.lateness_ms
        where = (Release.state == PUBLISHED) & late.is_not(None)
        row = session.execute(select(
            func.count(), func.coalesce(func.sum(late), 0.0),
            *(func.count().filter(late <= bound * 1000) for bound in LATENESS_BUCKETS))
            .where(where)).one()
        total, summed, cumulative = int(row[0]), float(row[1]), [int(n) for n in row[2:]]
        histogram = HistogramMetricFamily(
            "embargo_publication_lateness_seconds",
            "How long after its instant each release's publication started")
        histogram.add_metric([], [(repr(b), n) for b, n in zip(LATENESS_BUCKETS, cumulative,
                                                                strict=True)]
                             + [("+Inf", total)], sum_value=summed / 1000)
        return histogram

    def _outbox(self, session: Any, now: datetime) -> list[Metric]:
        pending = OutboxMessage.delivered_at.is_(None) & OutboxMessage.given_up_at.is_(None)
        row = session.execute(select(
            func.count().filter(pending),
            func.count().filter(OutboxMessage.delivered_at.is_not(None)),
            func.count().filter(OutboxMessage.given_up_at.is_not(None)
                                & OutboxMessage.failed_at.is_(None)),
            func.count().filter(OutboxMessage.failed_at.is_not(None)),
            func.count().filter(pending & (OutboxMessage.purpose == "copy")),
            func.min(OutboxMessage.not_before).filter(
                pending & (OutboxMessage.not_before <= now)))).one()
        notices = GaugeMetricFamily("embargo_notices", "Outbox messages by status (given_up: "
                                    "after retrying; failed: refused for good)",
                                    labels=["status"])
        for status, n in zip(("pending", "delivered", "given_up", "failed"), row[:4],
                             strict=True):  # failed: refused for good (not retried)
            notices.add_metric([status], int(n))
        oldest = row[5]
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        return [notices,
                GaugeMetricFamily("embargo_relay_backlog_age_seconds",
                                  "Age of the oldest message due and not yet delivered",
                                  value=age),
                GaugeMetricFamily("embargo_copies_pending",
                                  "Pre-embargo copies not yet delivered", value=int(row[4]))]

    def _skew(self, session: Any, now: datetime) -> Metric:
        skew = GaugeMetricFamily("embargo_node_clock_skew_seconds",
                                 "Each live node's clock minus the database server's",
                                 labels=["node"])
        for node in session.scalars(select(Node).where(Node.stopped_at.is_(None),
                                                       Node.heartbeat_at >= now - LIVE)):
            if node.skew_ms is not None:
                skew.add_metric([node.name], node.skew_ms / 1000)
        return skew

    def _rehearsals(self, session: Any, upcoming: list[str]) -> Metric:
        ready = GaugeMetricFamily("embargo_rehearsal_ready",
                                  "The last rehearsal of each upcoming release: 1 ready, "
                                  "0 not ready", labels=["release"])
        newest: dict[str, bool] = {}
        if upcoming:
            for release_id, ok in session.execute(
                    select(Rehearsal.release_id, Rehearsal.ready)
                    .where(Rehearsal.release_id.in_(upcoming))
                    .order_by(Rehearsal.at, Rehearsal.id)):
                newest[release_id] = bool(ok)
        for release_id, ok in newest.items():
            ready.add_metric([release_id], 1 if ok else 0)
        return ready


def readiness(services: Services) -> dict[str, str]:
    """Each part a node needs: "ok", or what is wrong."""
    results: dict[str, str] = {}

    def attempt(name: str, check: Callable[[], object]) -> None:
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]

    def database() -> None:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    attempt("database", database)
    attempt("vault", services.vault.check)
    attempt("public", services.public.check)
    attempt("key", lambda: check_key_pair(services.keys_dir))
    return results


def database_ok(services: Services) -> bool:
    """The database answers (the heartbeat pings only then)."""
    try:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("the database does not answer: %s", exc)
        return False
    return True


def check_key_pair(keys_dir: Path) -> None:
    """The private key loads and, where ``publisher.pub`` is beside it,
    matches it (what is queued is sealed to that one)."""
    private = load_private_key(keys_dir)
    if not (keys_dir / PUBLIC_NAME).exists():
        return
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if private.public_key().public_bytes(*raw) != load_public_key(keys_dir).public_bytes(*raw):
        raise ConfigError(f"the private key in {keys_dir} does not match {PUBLIC_NAME}: "
                          "releases queued with that public key cannot be opened")


class MetricsServer:
    """The HTTP server of ``/metrics`` and ``/healthz/*``, in a thread."""

    def __init__(self, bind: str, registry: CollectorRegistry,
                 ready: Callable[[], dict[str, str]]) -> None:
        host, _, port = bind.rpartition(":")
        self.registry = registry
        self.ready = ready
        self.server = ThreadingHTTPServer((host.strip("[]"), int(port)), self._handler())
        self.server.daemon_threads = True
        self.address = f"{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        name="embargo-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics and health on http://%s/metrics", self.address)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: %s", format % args)

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(owner.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz/live":
                    self._send(200, b'{"live": true}\n', "application/json")
                elif path == "/healthz/ready":
                    checks = owner.ready()
                    ok = all(v == "ok" for v in checks.values())
                    body = json.dumps({"ready": ok, "checks": checks,
                                       "failed": sorted(k for k, v in checks.items()
                                                        if v != "ok")}, indent=1)
                    self._send(200 if ok else 503, body.encode() + b"\n", "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

        return Handler


def start_metrics(bind: str | None, services: Services, *, overdue_after: timedelta,
                  timers: Callable[[], set[str]] | None = None) -> MetricsServer | None:
    """Serve on ``bind`` (None: off). A port already taken is logged, not
    fatal: the node still publishes."""
    if not bind:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EmbargoCollector(services, overdue_after=overdue_after, timers=timers))
    try:
        return MetricsServer(bind, registry, lambda: readiness(services)).start()
    except OSError as exc:
        log.error("cannot serve metrics on %s (%s); carrying on without them", bind, exc)
        return None
