"""The ``embargo`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import smtplib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from config.errors import EmbargoError, InputError, StateError, StorageError
from config.settings import Settings, load_settings
from jobs.app import build_services, start_node
from jobs.console import Stopper, table
from jobs.demo import run_demo
from jobs.logs import use_format
from jobs.mail import mail_probe, remove_copy_files
from jobs.nodes import list_nodes
from release import custody
from release import keys as keyfile
from release.audit import default_actor
from release.copies import access_list, trace
from release.manifest import load_manifest
from release.records import Release
from release.rehearsal import Rehearser, latest_reports, lead_text
from release.service import (
    ReleaseService,
    Services,
    describe_instant,
    embargo_of,
    notice_state,
    release_facts,
)
from storage import migrate
from storage.db import make_engine

log = logging.getLogger("embargo")
CHECK_FAILED = 10
NOT_READY = 11  # `embargo rehearse`: a check failed


# -- output helpers ---------------------------------------------------------------
class ProgressBar:
    """A one-line progress display on standard error, only on a terminal and
    only for files big enough to take a moment."""

    def __init__(self, stream: Any = sys.stderr, min_size: int = 8 << 20) -> None:
        self.stream = stream
        self.min_size = min_size
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0

    def __call__(self, name: str, done: int, total: int) -> None:
        if not self.enabled or total < self.min_size:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = int(width * done / total) if total else width
        self.stream.write(f"\rsealing {name[:30]:30} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done / 1048576:7.1f}/{total / 1048576:.1f} MiB")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# -- commands -----------------------------------------------------------------------
def _dependents(settings: Settings) -> int:
    """Releases whose data key is sealed to the current public key."""
    if not (settings.keys_dir / keyfile.PUBLIC_NAME).exists():
        return 0
    services = build_services(settings)
    return len(custody.active_releases(services))


def cmd_keys_init(settings: Settings, args: argparse.Namespace) -> int:
    private, public = keyfile.init_keys(settings.keys_dir, force=args.force,
                                        dependents=_dependents(settings))
    print(f"created the publisher key pair:\n  private {private} (mode 0600: keep it on the "
          f"publishing side only, and back it up)\n  public  {public}")
    return 0


def _print_findings(findings: list[custody.Finding], as_json: bool) -> int:
    if as_json:
        _json([{"what": f.what, "ok": f.ok, "detail": f.detail} for f in findings])
    else:
        for finding in findings:
            print(finding.line(), file=sys.stdout if finding.ok else sys.stderr)
    return 0 if all(f.ok for f in findings) else CHECK_FAILED


def _release_findings(services: Services, private: Any) -> list[custody.Finding]:
    releases = custody.active_releases(services)
    findings = [f for r in releases for f in custody.check_release(services, r, private)]
    if not releases:
        findings.append(custody.Finding(what="release", ok=True,
                                        detail="no queued release to check"))
    return findings


def cmd_keys_check(settings: Settings, args: argparse.Namespace) -> int:
    services = build_services(settings)
    findings, private = custody.check_keys(services, settings.keys_dir)
    if private is not None:
        findings += _release_findings(services, private)
    return _print_findings(findings, args.json)


def cmd_keys_rotate(settings: Settings, args: argparse.Namespace) -> int:
    services = build_services(settings)
    live = [n["name"] for n in list_nodes(services) if n["state"] == "live"]
    if live:
        raise StateError(f"{len(live)} scheduler node{'s are' if len(live) > 1 else ' is'} "
                         f"running ({', '.join(map(str, live))}): they hold the old private key "
                         "in memory; stop them, rotate, then start them again")
    rotation = custody.rotate(services, settings.keys_dir, actor=default_actor())
    print(f"rotated the publisher key pair: {rotation.old} -> {rotation.new}\n"
          f"  {len(rotation.resealed)} queued release data keys re-sealed to the new key; "
          f"the old pair is removed\n"
          f"  back up the new {settings.keys_dir / keyfile.PRIVATE_NAME} now, and copy "
          f"{keyfile.PUBLIC_NAME} to every machine that queues")
    return 0


def cmd_config_show(settings: Settings, args: argparse.Namespace) -> int:
    shown = settings.public_dict()
    if args.json:
        _json(shown)
    else:
        print(table([(k, v, settings.sources.get(k, "derived")) for k, v in shown.items()],
                    ["setting", "value", "from"]))
    return 0


def _service(settings: Settings) -> tuple[Services, ReleaseService]:
    services = build_services(settings)
    return services, ReleaseService(services, actor=default_actor())


def cmd_queue(settings: Settings, args: argparse.Namespace) -> int:
    spec = load_manifest(Path(args.manifest), publish_on=args.publish_on, at=args.at,
                         zone=args.zone, copies_at=args.copies_at)
    _, service = _service(settings)
    release = service.queue(spec, progress=ProgressBar())
    for warning in spec.warnings:  # after success: a failed queue prints one line
        print(f"warning: {warning}", file=sys.stderr)
    print(release.id)
    print(f"queued \"{release.title}\": {len(release.documents)} documents sealed, "
          f"{len(release.recipients)} recipients; publishes {embargo_of(release).describe()}",
          file=sys.stderr)
    if release.recipients and release.copies_at is not None:
        print(f"pre-embargo copies go {describe_instant(release.copies_at, release.zone)}",
              file=sys.stderr)
    elif release.recipients:
        print("no pre-embargo copies: the embargo is too close for them to arrive before it "
              "(copies.cutoff)", file=sys.stderr)
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    services, service = _service(settings)
    now = services.clock.now()
    releases = service.all_releases()
    facts = [release_facts(r, now) for r in releases]
    if args.json:
        for release, fact in zip(releases, facts, strict=True):
            fact["documents"] = [{"id": d.id, "name": d.filename, "kind": d.kind,
                                  "organisation": d.organisation, "size": d.size,
                                  "sha256": d.sha256} for d in release.documents]
        _json(facts)
        return 0
    if not releases:
        print("no releases; queue one with `embargo queue MANIFEST.toml`")
        return 0
    rows = []
    for r, f in zip(releases, facts, strict=True):
        rows.append((r.id, r.title if len(r.title) <= 40 else r.title[:39] + "…", r.state,
                     f["embargo"], f["time_left"] or ""))
    print(table(rows, ["id", "title", "state", "embargo (local and UTC)", "time left"]))
    return 0


def _show_facts(service: ReleaseService, release: Release, now: Any) -> dict[str, Any]:
    facts = release_facts(release, now)
    # A release that failed, or was cancelled, part-way: links to what is public all the same.
    partly = (set(service.public_objects(release)) if release.state in ("failed", "cancelled")
              else set())
    public = service.s.public
    facts["documents"] = [{"id": d.id, "name": d.filename, "kind": d.kind,
                           "organisation": d.organisation, "content_type": d.content_type,
                           "size": d.size, "sha256": d.sha256,
                           "published_at": d.published_at,
                           "url": d.public_url or (public.url(f"{release.slug}/{d.filename}")
                                                   if f"{release.slug}/{d.filename}" in partly
                                                   else None)}
                          for d in release.documents]
    facts["started_at"] = release.started_at
    facts["recipients"] = [{"id": r.id, "name": r.name, "email": r.email,
                            "organisation": r.organisation} for r in release.recipients]
    facts["notices"] = [{"id": m.id, "to": m.to_addr, "purpose": m.purpose,
                         "message_id": m.message_id, "state": notice_state(m),
                         "delivered_at": m.delivered_at, "via": m.delivered_to,
                         "attempts": m.attempts, "last_error": m.last_error}
                        for m in service.outbox(release.id)]
    facts["access_list"] = access_list(service.s, release.id)
    facts["rehearsals"] = [{"id": r.id, "at": r.at, "lead": lead_text(r.lead),
                            "ready": r.ready,
                            "checks": [dataclasses.asdict(c) for c in r.checks]}
                           for r in latest_reports(service.s, release)]
    facts["events"] = [{"seq": e.seq, "at": e.at, "action": e.action, "actor": e.actor,
                        "details": json.loads(e.details)} for e in service.events(release.id)]
    return facts


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    services, service = _service(settings)
    release = service.get(args.id)
    facts = _show_facts(service, release, services.clock.now())
    if args.json:
        _json(facts)
        return 0
    print(f"{release.title}\n  id       {release.id}\n  state    {release.state}"
          f"\n  embargo  {facts['embargo']}")
    if facts["time_left"]:
        print(f"  left     {facts['time_left']}")
    if release.started_at:
        print(f"  started  {release.started_at.isoformat()} (first attempt)")
    if release.published_at:
        print(f"  published {release.published_at.isoformat()} (the last document public, "
              f"{release.lateness_ms} ms after the instant by the reference clock)")
    if release.reason:
        print(f"  reason   {release.reason}")
    print("\ndocuments")
    print(table([(d["id"], d["name"], d["kind"], d["organisation"] or "", d["size"],
                  d["sha256"][:12], d["url"] or "") for d in facts["documents"]],
                ["id", "name", "kind", "organisation", "bytes", "sha256", "public at"]))
    print("\nrecipients")
    print(table([(r["name"], r["email"], r["organisation"] or "") for r in facts["recipients"]],
                ["name", "email", "organisation"]))
    print("\npre-release access (copies)")
    if facts["access_list"]:
        _print_access(facts["access_list"], release.zone)
    elif release.copies_at is not None and release.state == "queued":
        print(f"  none sent yet; due {describe_instant(release.copies_at, release.zone)}")
    else:
        print("  none")
    if facts["notices"]:
        print("\nnotices")
        print(table([(n["id"], n["to"], n["purpose"], n["state"],
                      n["delivered_at"] or "", n["via"] or "",
                      n["last_error"] or "") for n in facts["notices"]],
                    ["#", "to", "purpose", "state", "delivered", "via", "last error"]))
    reports = latest_reports(service.s, release)
    if reports:
        last = reports[-1]
        print(f"\nrehearsal ({lead_text(last.lead)}, {describe_instant(last.at, release.zone)}; "
              f"{len(reports)} in all)")
        print("\n".join(f"  {line}" for line in last.lines()))
    print("\naudit")
    print(table([(e["seq"], e["at"], e["action"], e["actor"]) for e in facts["events"]],
                ["#", "at (UTC)", "event", "by"]))
    return 0


def _print_access(rows: list[dict[str, Any]], zone: str) -> None:
    print(table([(r["name"], r["email"], r["organisation"] or "", ", ".join(r["documents"]),
                  r["copy_id"],
                  describe_instant(r["sent_at"], zone) if r["sent_at"] else "not yet delivered")
                 for r in rows],
                ["name", "email", "organisation", "documents", "copy", "sent"]))


def cmd_access_list(settings: Settings, args: argparse.Namespace) -> int:
    services, service = _service(settings)
    release = service.get(args.id)
    rows = access_list(services, release.id)
    if args.json:
        _json(rows)
        return 0
    print(f"Pre-release access: {release.title}\n"
          f"embargoed until {embargo_of(release).describe()}\n")
    if rows:
        _print_access(rows, release.zone)
    else:
        print("no pre-embargo copies have been issued")
    return 0


def cmd_trace(settings: Settings, args: argparse.Namespace) -> int:
    services, _ = _service(settings)
    path = Path(args.what)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path} cannot be read: {exc.strerror}") from None
        found = trace(services, str(path), data)
    else:
        found = trace(services, args.what)
    print(f"copy {found.copy_id} of \"{found.title}\" ({found.release_id})\n"
          f"  sent to  {found.name} <{found.email}>, {found.organisation or '-'}\n"
          f"  issued   {found.issued_at.isoformat()}\n"
          f"  delivered {found.sent_at.isoformat() if found.sent_at else 'not delivered'}")
    return 0


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    services, service = _service(settings)
    release = service.cancel(args.id, reason=args.reason)
    print(f"cancelled {release.id}; its data key is destroyed and it can never be published")
    removed, mailed = remove_copy_files(services, release.id, settings.outbox_dir,
                                        actor=service.actor)
    if removed:
        print(f"removed {removed} pre-embargo copy file(s) from {settings.outbox_dir}")
    if mailed:
        print(f"{mailed} pre-embargo copy(ies) were delivered by mail and remain in the "
              "officers' mailboxes; each officer is sent a withdrawal notice")
    elif not removed:
        print("no pre-embargo copy had been delivered")
    public = service.public_objects(release)
    if public:
        print(f"{len(public)} of its objects are public (a partial publication): "
              f"`embargo unpublish {release.id}` removes them")
    return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    release = service.retry(args.id)
    print(f"{release.id} is queued again; a running scheduler publishes it "
          f"{'now' if release.instant <= service.s.clock.now() else 'at its instant'} "
          f"(last failure: {release.reason})")
    return 0


def cmd_unpublish(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    removed = service.unpublish(args.id)
    print(f"removed {len(removed)} public object{'s' if len(removed) != 1 else ''} of "
          f"{args.id}" + "".join(f"\n  {url}" for url in removed))
    return 0


def cmd_resend(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    rows = service.resend(args.id, to=args.to)
    for row in rows:
        print(f"notice {row.id} ({row.purpose}) to {row.to_addr} will be sent again as "
              f"{row.message_id}")
    print("a running `embargo run` node delivers it" if rows else "nothing to resend")
    return 0


def cmd_reschedule(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    before = embargo_of(service.get(args.id)).describe()
    release = service.reschedule(args.id, publish_on=args.publish_on, at=args.at, zone=args.zone)
    print(f"rescheduled {release.id}\n  was  {before}\n  now  {embargo_of(release).describe()}")
    return 0


def cmd_audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    report = service.verify_audit()
    if report.ok:
        print(f"audit chain intact: {report.events} events")
        return 0
    print(f"audit chain broken at event {report.first_bad}: {report.problem}", file=sys.stderr)
    return 8


def _check_mail(settings: Settings) -> custody.Finding:
    if settings["mail.transport"] != "smtp":
        folder = settings.outbox_dir

        def write() -> None:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=folder, prefix=".probe-")
            os.close(fd)
            os.unlink(name)

        return custody.probe("mail", write, f"file outbox {folder}")
    host, port = settings["mail.smtp_host"], settings["mail.smtp_port"]
    where = f"smtp://{host}:{port}"
    try:
        smtp: smtplib.SMTP
        if settings["mail.smtp_security"] == "tls":
            smtp = smtplib.SMTP_SSL(host, port, timeout=10)
        else:
            smtp = smtplib.SMTP(host, port, timeout=10)
            if settings["mail.smtp_security"] == "starttls":
                smtp.starttls()
        if settings["mail.smtp_username"]:
            smtp.login(settings["mail.smtp_username"], settings["mail.smtp_password"] or "")
        code, _ = smtp.noop()
        smtp.quit()
    except (OSError, smtplib.SMTPException) as exc:
        return custody.Finding(what="mail", ok=False, detail=f"{where} cannot be reached: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if code != 250:
        return custody.Finding(what="mail", ok=False, detail=f"{where} answered NOOP with {code}")
    return custody.Finding(what="mail", ok=True, detail=f"{where} answers")


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    services, _ = _service(settings)

    def vault() -> None:
        services.vault.check()
        custody.probe_vault(services.vault)

    def public() -> None:
        services.public.check()
        custody.probe_public(services.public)

    findings = [custody.probe("vault", vault, settings.vault),
                custody.probe("public", public, settings.public)]
    key_findings, private = custody.check_keys(services, settings.keys_dir)
    findings += key_findings
    findings += _release_findings(services, private)
    findings.append(_check_mail(settings))
    if args.repair:
        swept = custody.sweep_orphans(services, now=services.clock.now(), actor=default_actor())
        findings.append(custody.Finding(what="repair", ok=True, detail=(
            f"removed {swept.objects} orphaned sealed objects ({swept.bytes} bytes) of "
            f"{len(swept.releases)} unfinished queues and {swept.partials} partial files "
            f"({swept.partial_bytes} bytes); kept {len(swept.kept)} younger than an hour")))
    return _print_findings(findings, args.json)


def cmd_rehearse(settings: Settings, args: argparse.Namespace) -> int:
    services, service = _service(settings)
    release = service.get(args.id)
    rehearser = Rehearser(services, keyfile.load_private_key(settings.keys_dir),
                          mail=mail_probe(settings),
                          min_nodes=settings["rehearsal.min_nodes"],
                          mail_passed=settings["rehearsal.mail_passed"], actor=service.actor)
    report = rehearser.rehearse(release.id, now=services.clock.now())
    assert report is not None  # one by hand is always recorded
    print("\n".join(report.lines()))
    return 0 if report.ready else NOT_READY


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    services = build_services(settings)
    try:  # leftovers of killed queues; never a reason not to start
        custody.sweep_orphans(services, now=services.clock.now(), actor="scheduler")
    except EmbargoError as exc:
        log.warning("could not sweep what killed queues left: %s", exc)
    stopper = Stopper()
    stopper.install()
    node = start_node(settings, services, stopper.event)
    counts = ReleaseService(services, actor="scheduler").counts()
    clock = ("clock ok" if node.monitor.clock_ok else
             "CLOCK SKEWED: this node will not publish")
    print(f"embargo scheduler running as {node.name} ({counts.get('queued', 0)} queued, "
          f"{counts.get('publishing', 0)} publishing; {clock}, skew "
          f"{node.monitor.skew_ms} ms"
          f"{f'; metrics on http://{node.metrics.address}/metrics' if node.metrics else ''}"
          "); Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
    if settings["mail.transport"] == "file":
        print(f"notices are .eml files in {settings.outbox_dir} (mail.transport = \"file\", "
              "for trying Embargo out): a pre-embargo copy there is plaintext on this disk",
              file=sys.stderr, flush=True)
    try:
        stopper.event.wait()
    finally:
        node.shutdown()
    return 0


def cmd_nodes(settings: Settings, args: argparse.Namespace) -> int:
    services, _ = _service(settings)
    rows = list_nodes(services)
    if args.json:
        _json(rows)
    elif not rows:
        print("no node has run against this database")
    else:
        print(table([(r["name"], r["state"], r["heartbeat_s_ago"],
                      "" if r["skew_ms"] is None else f"{r['skew_ms']:+.1f}",
                      "yes" if r["clock_ok"] else "NO", r["doing"]) for r in rows],
                    ["node", "state", "heartbeat (s ago)", "clock skew (ms)", "clock ok",
                     "doing"]))
    return 0


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    engine = make_engine(settings.database_url)
    before = migrate.current(engine)
    after = migrate.upgrade(engine)
    print(f"database schema: {before or 'empty'} -> {after} (latest {migrate.head()})")
    return 0


def cmd_db_current(settings: Settings, args: argparse.Namespace) -> int:
    engine = make_engine(settings.database_url)
    now = migrate.current(engine)
    print(f"database schema: {now or 'empty'} (latest {migrate.head()})")
    return 0 if now == migrate.head() else 9


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    if args.storage == "s3":
        bucket = args.bucket
        settings = load_settings(config_file=args.config, overrides={
            "data_dir": args.data_dir,
            "storage.vault": f"s3://{bucket}-vault/vault",
            "storage.public": f"s3://{bucket}-public/releases",
            "s3.endpoint_url": args.endpoint_url,
            "s3.addressing_style": "path" if args.endpoint_url else None})
    elif args.endpoint_url:
        raise InputError("--endpoint-url goes with --storage s3")
    return run_demo(settings, seconds=args.seconds, create_buckets=args.storage == "s3")


# -- parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embargo", description="Release embargoed documents on time, never early.")
    parser.add_argument("--config", metavar="PATH", help="TOML settings file (or EMBARGO_CONFIG)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder for the embedded defaults (default ./var)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = sub.add_parser("keys", help="the publisher's key pair")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = keys_sub.add_parser("init", help="create the key pair (never over an existing key)")
    init.add_argument("--force", action="store_true",
                      help="replace a public key whose private key is gone, when no release "
                           "depends on it")
    init.set_defaults(func=cmd_keys_init)
    kcheck = keys_sub.add_parser("check", help="prove the private key matches the public key "
                                               "and opens every queued release")
    kcheck.add_argument("--json", action="store_true")
    kcheck.set_defaults(func=cmd_keys_check)
    keys_sub.add_parser("rotate", help="a new key pair; every queued release's data key "
                                       "re-sealed to it (scheduler nodes stopped)"
                        ).set_defaults(func=cmd_keys_rotate)

    config = sub.add_parser("config", help="settings")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show_cfg = config_sub.add_parser("show", help="print the effective settings (no secrets)")
    show_cfg.add_argument("--json", action="store_true")
    show_cfg.set_defaults(func=cmd_config_show)

    def when(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--publish-on", required=required, metavar="DATE",
                       help="2014-09-04, 'Thursday 4 September 2014', or an ISO timestamp "
                            "with offset")
        p.add_argument("--at", metavar="HH:MM", help="local time of day (default 00:01)")
        p.add_argument("--zone", metavar="ZONE", help="IANA zone (default Europe/London)")

    queue = sub.add_parser("queue", help="seal and queue a release from a manifest")
    queue.add_argument("manifest", metavar="MANIFEST.toml")
    when(queue, False)
    queue.add_argument("--copies-at", metavar="WHEN",
                       help="when liaison officers get pre-embargo copies: local "
                            "'YYYY-MM-DD HH:MM' or an ISO timestamp with offset "
                            "(default: as soon as queued, within copies.max_lead)")
    queue.set_defaults(func=cmd_queue)

    lst = sub.add_parser("list", help="all releases")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="one release in full")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    cancel = sub.add_parser("cancel", help="cancel a release and destroy its data key")
    cancel.add_argument("id")
    cancel.add_argument("--reason", required=True)
    cancel.set_defaults(func=cmd_cancel)

    retry = sub.add_parser("retry", help="put a failed release back in the queue")
    retry.add_argument("id")
    retry.set_defaults(func=cmd_retry)

    unpub = sub.add_parser("unpublish",
                           help="remove the public objects of a cancelled, partly public release")
    unpub.add_argument("id")
    unpub.set_defaults(func=cmd_unpublish)
    resend = sub.add_parser("resend", help="send a failed or given-up notice again "
                                           "(same Message-ID)")
    resend.add_argument("id", help="the notice's number (see show), its Message-ID, or a "
                                   "release id (all its failed notices)")
    resend.add_argument("--to", metavar="EMAIL", help="send it to this address instead")
    resend.set_defaults(func=cmd_resend)

    resched = sub.add_parser("reschedule", help="move a queued release to a new instant")
    resched.add_argument("id")
    when(resched, True)
    resched.set_defaults(func=cmd_reschedule)

    acc = sub.add_parser("access-list", help="who received pre-embargo copies, and when")
    acc.add_argument("id")
    acc.add_argument("--json", action="store_true")
    acc.set_defaults(func=cmd_access_list)

    trc = sub.add_parser("trace", help="whose copy a leaked file (or copy id) is")
    trc.add_argument("what", metavar="FILE|COPY-ID")
    trc.set_defaults(func=cmd_trace)

    aud = sub.add_parser("audit", help="the audit chain")
    aud_sub = aud.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    aud_sub.add_parser("verify", help="check the chain").set_defaults(func=cmd_audit_verify)

    nodes = sub.add_parser("nodes", help="scheduler nodes: heartbeat, clock skew, work")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(func=cmd_nodes)

    db = sub.add_parser("db", help="the database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", help="migrate to the latest schema (safe to repeat)"
                      ).set_defaults(func=cmd_db_upgrade)
    db_sub.add_parser("current", help="show the schema revision"
                      ).set_defaults(func=cmd_db_current)

    check = sub.add_parser("check", help="keys, every queued release's sealed objects, probe "
                                         "writes to the vault and public location, the mail "
                                         "server")
    check.add_argument("--json", action="store_true")
    check.add_argument("--repair", action="store_true",
                       help="also remove what killed queues left (older than an hour)")
    check.set_defaults(func=cmd_check)
    sub.add_parser("run", help="run the scheduler until stopped").set_defaults(func=cmd_run)

    rehearse = sub.add_parser("rehearse", help="prove a release would publish, publishing "
                              "nothing (exit status 11 when a check fails)")
    rehearse.add_argument("id")
    rehearse.set_defaults(func=cmd_rehearse)

    demo = sub.add_parser("demo", help="queue and publish a demo release, start to finish")
    demo.add_argument("--seconds", type=int, default=10, help="embargo this far ahead")
    demo.add_argument("--storage", choices=("folder", "s3"), default="folder",
                      help="where the vault and the public documents go (default: folders)")
    demo.add_argument("--endpoint-url", metavar="URL",
                      help="an S3-compatible server, e.g. http://127.0.0.1:9000 (default: AWS)")
    demo.add_argument("--bucket", default="embargo-demo", metavar="NAME",
                      help="with --storage s3: buckets NAME-vault and NAME-public, "
                           "created if missing")
    demo.set_defaults(func=cmd_demo)
    return parser


class UTCFormatter(logging.Formatter):
    """Log timestamps in UTC, marked ``Z``, whatever the machine's TZ."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def configure_logging(level: int) -> None:
    """A handler on standard error with UTC timestamps (unless logging is
    already set up, as ``basicConfig`` does), and Python warnings
    (``warnings.warn`` in libraries) routed through logging as WARNING
    records of the ``py.warnings`` logger rather than printed raw."""
    handler = logging.StreamHandler()
    handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    try:
        overrides = {"data_dir": args.data_dir} if args.data_dir else {}
        settings = load_settings(config_file=args.config, overrides=overrides)
        use_format(settings["log.format"])
        status: int = args.func(settings, args)
        return status
    except EmbargoError as exc:
        print(f"embargo: {exc}", file=sys.stderr)
        return exc.exit_status
    except DBAPIError as exc:  # e.g. the schema check, before any transaction
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"embargo: the database cannot be used: {first}", file=sys.stderr)
        return StorageError.exit_status
    except KeyboardInterrupt:
        print("embargo: interrupted; nothing half-done was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `embargo list | head`: the reader left; so do we, quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
