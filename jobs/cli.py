"""The ``embargo`` command."""

from __future__ import annotations

import argparse
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

from config import errors
from config.errors import EmbargoError, InputError, StateError, StorageError, status_for
from config.settings import Settings, load_settings
from jobs.app import build_services, start_node
from jobs.console import SealingProgress, Stopper, print_table
from jobs.demo import run_demo
from jobs.logs import use_format
from jobs.mail import mail_probe, remove_copy_files
from release import accounts, approval, custody
from release import keys as keyfile
from release.audit import default_actor
from release.manifest import load_manifest
from release.records import ReleaseState
from release.rehearsal import Rehearser, latest_reports, lead_text
from release.service import ReleaseService, Services
from release.views import AccessEntry, Finding, Moment, to_json, utc_text
from storage import migrate
from storage.db import make_engine

log = logging.getLogger("embargo")
CHECK_FAILED = 10
NOT_READY = 11  # `embargo rehearse`: a check failed


# -- errors: the one mapping of the error tree for the command line ---------------------
EXIT_STATUS: dict[type[EmbargoError], int] = {
    errors.EmbargoError: 1,
    errors.ConfigError: 2,
    errors.InputError: 2,
    errors.NotFoundError: 3,
    errors.StateError: 4,
    errors.SealError: 5,
    errors.StorageError: 6,
    errors.DeliveryError: 7,
    errors.SchemaError: 9,  # as `embargo db current` on a schema that is not the latest
}

# What to do next, in this interface's words, added to the domain's message
# (which has the facts).
HINTS: dict[type[EmbargoError], str] = {
    errors.ReleaseNotFoundError: " (see `embargo list`)",
    errors.AmbiguousIdError: " (see `embargo list`)",
    errors.SchemaError: ": run `embargo db upgrade`",
}


def hint_for(error: EmbargoError) -> str:
    return next((HINTS[cls] for cls in type(error).__mro__ if cls in HINTS), "")


# -- output helpers ---------------------------------------------------------------
def _json(data: object) -> None:
    print(to_json(data))


def _shown(moment: Moment | None, missing: str = "") -> str:
    return moment.shown if moment is not None else missing


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


def _print_findings(findings: list[Finding], as_json: bool) -> int:
    if as_json:
        _json(findings)
    else:
        for finding in findings:
            print(finding.line(), file=sys.stdout if finding.ok else sys.stderr)
    return 0 if all(f.ok for f in findings) else CHECK_FAILED


def _release_findings(services: Services, private: Any) -> list[Finding]:
    releases = custody.active_releases(services)
    findings = [f for r in releases for f in custody.check_release(services, r, private)]
    if not releases:
        findings.append(Finding(what="release", ok=True,
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
    live = [n.name for n in ReleaseService(services, actor=default_actor()).nodes()
            if n.state == "live"]
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
        print(json.dumps(shown, indent=2, ensure_ascii=False))
    else:
        print_table([(k, v, settings.sources.get(k, "derived")) for k, v in shown.items()],
                    ["setting", "value", "from"])
    return 0


def _service(settings: Settings) -> tuple[Services, ReleaseService]:
    services = build_services(settings)
    return services, ReleaseService(services, actor=default_actor())


def cmd_queue(settings: Settings, args: argparse.Namespace) -> int:
    spec = load_manifest(Path(args.manifest), publish_on=args.publish_on, at=args.at,
                         zone=args.zone, copies_at=args.copies_at)
    _, service = _service(settings)
    with SealingProgress() as progress:
        release = service.queue(spec, progress=progress)
    for warning in spec.warnings:  # after success: a failed queue prints one line
        print(f"warning: {warning}", file=sys.stderr)
    print(release.id)
    print(f"queued \"{release.title}\": {len(release.documents)} documents sealed, "
          f"{release.recipient_count} recipients; publishes {release.embargo}",
          file=sys.stderr)
    if release.recipient_count and release.copies_at is not None:
        print(f"pre-embargo copies go {release.copies_at.shown}", file=sys.stderr)
    elif release.recipient_count:
        print("no pre-embargo copies: the embargo is too close for them to arrive before it "
              "(copies.cutoff)", file=sys.stderr)
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    releases = service.list_releases()
    if args.json:
        _json(releases)
        return 0
    if not releases:
        print("no releases; queue one with `embargo queue MANIFEST.toml`")
        return 0
    print_table([(r.id, r.title if len(r.title) <= 40 else r.title[:39] + "…", r.state,
                  r.embargo, r.time_left or "") for r in releases],
                ["id", "title", "state", "embargo (local and UTC)", "time left"])
    return 0


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    release = service.get(args.id)
    if args.json:
        _json(release)
        return 0
    print(f"{release.title}\n  id       {release.id}\n  state    {release.state}"
          f"\n  embargo  {release.embargo}")
    if release.time_left:
        print(f"  left     {release.time_left}")
    if release.started_at:
        print(f"  started  {utc_text(release.started_at.utc)} (first attempt)")
    if release.published_at:
        print(f"  published {utc_text(release.published_at.utc)} (the last document public, "
              f"{release.lateness_ms} ms after the instant by the reference clock)")
    if release.reason:
        print(f"  reason   {release.reason}")
    print()
    print_table([(d.id, d.filename, d.kind, d.organisation or "", d.size, d.sha256[:12],
                  d.public_url or "") for d in release.documents],
                ["id", "name", "kind", "organisation", "bytes", "sha256", "public at"],
                title="documents")
    print()
    print_table([(r.name, r.email, r.organisation or "") for r in release.recipients],
                ["name", "email", "organisation"], title="recipients")
    print()
    if release.access_list:
        _print_access(release.access_list, title="pre-release access (copies)")
    elif release.copies_at is not None and release.state == ReleaseState.QUEUED:
        print(f"pre-release access (copies)\n  none sent yet; due {release.copies_at.shown}")
    else:
        print("pre-release access (copies)\n  none")
    if release.notices:
        print()
        print_table([(n.number, n.to, n.purpose, n.state, _shown(n.delivered_at), n.via or "",
                      n.last_error or "") for n in release.notices],
                    ["#", "to", "purpose", "state", "delivered", "via", "last error"],
                    title="notices")
    reports = latest_reports(service.s, release.id)
    if reports:
        last = reports[-1]
        print(f"\nrehearsal ({lead_text(last.lead)}, {utc_text(last.at)} UTC; "
              f"{len(reports)} in all)")
        print("\n".join(f"  {line}" for line in last.lines()))
    print()
    print_table([(e.seq, utc_text(e.at), e.action, e.actor) for e in release.events],
                ["#", "at (UTC)", "event", "by"], title="audit")
    return 0


def _print_access(rows: Sequence[AccessEntry], title: str | None = None) -> None:
    print_table([(r.name, r.email, r.organisation or "", ", ".join(r.documents), r.copy_id,
                  _shown(r.sent_at, "not yet delivered")) for r in rows],
                ["name", "email", "organisation", "documents", "copy", "sent"], title=title)


def cmd_access_list(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    release, rows = service.access_list(args.id)
    if args.json:
        _json(rows)
        return 0
    print(f"Pre-release access: {release.title}\n"
          f"embargoed until {release.embargo}\n")
    if rows:
        _print_access(rows)
    else:
        print("no pre-embargo copies have been issued")
    return 0


def cmd_trace(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    path = Path(args.what)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path} cannot be read: {exc.strerror}") from None
        found = service.trace(str(path), data)
    else:
        found = service.trace(args.what)
    if args.json:
        _json(found)
        return 0
    print(f"copy {found.copy_id} of \"{found.title}\" ({found.release_id})\n"
          f"  sent to  {found.name} <{found.email}>, {found.organisation or '-'}\n"
          f"  issued   {utc_text(found.issued_at.utc)}\n"
          f"  delivered {utc_text(found.sent_at.utc) if found.sent_at else 'not delivered'}")
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
        print(f"notice {row.number} ({row.purpose}) to {row.to} will be sent again as "
              f"{row.message_id}")
    print("a running `embargo run` node delivers it" if rows else "nothing to resend")
    return 0


def cmd_reschedule(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    before = service.get(args.id).embargo
    release = service.reschedule(args.id, publish_on=args.publish_on, at=args.at, zone=args.zone)
    print(f"rescheduled {release.id}\n  was  {before}\n  now  {release.embargo}")
    return 0


def cmd_approve(settings: Settings, args: argparse.Namespace) -> int:
    if args.reason and not args.force:
        raise InputError("--reason goes with --force (approving your own submission)")
    services, _ = _service(settings)
    release = approval.approve(services, args.id, actor=default_actor(),
                               force_reason=args.reason if args.force else None)
    flag = " (force-approved: flagged until someone else reviews it)" if args.force else ""
    print(f"approved {release.id}{flag}: publishes {release.embargo}")
    return 0


def cmd_send_back(settings: Settings, args: argparse.Namespace) -> int:
    services, _ = _service(settings)
    release = approval.send_back(services, args.id, actor=default_actor(), comment=args.comment)
    print(f"sent {release.id} back to its editor as a draft")
    return 0


def cmd_users_add(settings: Settings, args: argparse.Namespace) -> int:
    services, _ = _service(settings)
    user, password = accounts.add_user(services, name=args.name, email=args.email,
                                       role=args.role, actor=default_actor())
    print(f"added {user.name} ({user.role}); one-time password, to be changed at the first "
          f"sign-in:\n{password}")
    return 0


def cmd_users_list(settings: Settings, args: argparse.Namespace) -> int:
    services, _ = _service(settings)
    users = accounts.list_users(services)
    if args.json:
        _json([{"name": u.name, "email": u.email, "role": u.role, "disabled": u.disabled,
                "must_change": u.must_change, "locked_until": u.locked_until} for u in users])
    elif not users:
        print("no users; add the first admin with `embargo users add NAME EMAIL --role admin`")
    else:
        print_table([(u.name, u.email, u.role, "disabled" if u.disabled else
                      "must change password" if u.must_change else "active")
                     for u in users], ["name", "email", "role", "state"])
    return 0


def cmd_users_disable(settings: Settings, args: argparse.Namespace) -> int:
    services, _ = _service(settings)
    user = accounts.disable_user(services, args.name, actor=default_actor())
    print(f"disabled {user.name}; their sessions are ended")
    return 0


def cmd_users_reset(settings: Settings, args: argparse.Namespace) -> int:
    services, _ = _service(settings)
    user, password = accounts.reset_user(services, args.name, actor=default_actor())
    print(f"reset {user.name}: unlocked, sessions ended; one-time password:\n{password}")
    return 0


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from web.app import create_app  # the console imports no jobs module; only this does

    app = create_app(settings)
    host, _, port = settings.web.bind.rpartition(":")
    print(f"embargo console on http://{settings.web.bind}/ (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host.strip("[]"), port=int(port), log_level="warning",
                proxy_headers=True, forwarded_allow_ips="127.0.0.1")
    return 0


def cmd_audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    report = service.verify_audit()
    if report.ok:
        print(f"audit chain intact: {report.events} events")
        return 0
    print(f"audit chain broken at event {report.first_bad}: {report.problem}", file=sys.stderr)
    return 8


def _check_mail(settings: Settings) -> Finding:
    if settings.mail.transport != "smtp":
        folder = settings.outbox_dir

        def write() -> None:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=folder, prefix=".probe-")
            os.close(fd)
            os.unlink(name)

        return custody.probe("mail", write, f"file outbox {folder}")
    host, port = settings.mail.smtp_host, settings.mail.smtp_port
    where = f"smtp://{host}:{port}"
    try:
        smtp: smtplib.SMTP
        if settings.mail.smtp_security == "tls":
            smtp = smtplib.SMTP_SSL(host, port, timeout=10)
        else:
            smtp = smtplib.SMTP(host, port, timeout=10)
            if settings.mail.smtp_security == "starttls":
                smtp.starttls()
        if settings.mail.smtp_username:
            smtp.login(settings.mail.smtp_username, settings.mail.smtp_password or "")
        code, _ = smtp.noop()
        smtp.quit()
    except (OSError, smtplib.SMTPException) as exc:
        return Finding(what="mail", ok=False, detail=f"{where} cannot be reached: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if code != 250:
        return Finding(what="mail", ok=False, detail=f"{where} answered NOOP with {code}")
    return Finding(what="mail", ok=True, detail=f"{where} answers")


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
        findings.append(Finding(what="repair", ok=True, detail=(
            f"removed {swept.objects} orphaned sealed objects ({swept.bytes} bytes) of "
            f"{len(swept.releases)} unfinished queues and {swept.partials} partial files "
            f"({swept.partial_bytes} bytes); kept {len(swept.kept)} younger than an hour")))
    return _print_findings(findings, args.json)


def cmd_rehearse(settings: Settings, args: argparse.Namespace) -> int:
    services, service = _service(settings)
    release = service.get(args.id)
    rehearser = Rehearser(services, keyfile.load_private_key(settings.keys_dir),
                          mail=mail_probe(settings),
                          min_nodes=settings.rehearsal.min_nodes,
                          mail_passed=settings.rehearsal.mail_passed, actor=service.actor)
    report = rehearser.rehearse(release.id, now=services.clock.now())
    assert report is not None  # one by hand is always recorded
    print("\n".join(report.lines()))
    return 0 if report.ready else NOT_READY


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    services = build_services(settings, migrate_schema=True)  # locked: nodes may start at once
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
    print(f"embargo scheduler running as {node.name} ({counts.queued} queued, "
          f"{counts.publishing} publishing; {clock}, skew "
          f"{node.monitor.skew_ms} ms"
          f"{f'; metrics on http://{node.metrics.address}/metrics' if node.metrics else ''}"
          "); Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
    if settings.mail.transport == "file":
        print(f"notices are .eml files in {settings.outbox_dir} (mail.transport = \"file\", "
              "for trying Embargo out): a pre-embargo copy there is plaintext on this disk",
              file=sys.stderr, flush=True)
    try:
        stopper.event.wait()
    finally:
        node.shutdown()
    if node.watch.fatal:  # the node stopped itself: its database lost its schema
        print(f"embargo: {node.watch.fatal}; check database.url, then `embargo db upgrade` "
              "only if this is a new, empty database", file=sys.stderr)
        return EXIT_STATUS[errors.SchemaError]
    return 0


def cmd_nodes(settings: Settings, args: argparse.Namespace) -> int:
    _, service = _service(settings)
    rows = service.nodes()
    if args.json:
        _json(rows)
    elif not rows:
        print("no node has run against this database")
    else:
        print_table([(r.name, r.state, r.heartbeat_s_ago,
                      "" if r.skew_ms is None else f"{r.skew_ms:+.1f}",
                      "yes" if r.clock_ok else "NO", r.doing) for r in rows],
                    ["node", "state", "heartbeat (s ago)", "clock skew (ms)", "clock ok",
                     "doing"])
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
    trc.add_argument("--json", action="store_true")
    trc.set_defaults(func=cmd_trace)

    appr = sub.add_parser("approve", help="approve a release awaiting approval (a second person)")
    appr.add_argument("id")
    appr.add_argument("--force", action="store_true",
                      help="approve your own submission (needs --reason; audited and flagged)")
    appr.add_argument("--reason", help="why you approve your own submission")
    appr.set_defaults(func=cmd_approve)

    back = sub.add_parser("send-back", help="return a release awaiting approval to its editor")
    back.add_argument("id")
    back.add_argument("--comment", required=True)
    back.set_defaults(func=cmd_send_back)

    users = sub.add_parser("users", help="console accounts")
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = users_sub.add_parser("add", help="add an account; prints a one-time password")
    add.add_argument("name")
    add.add_argument("email")
    add.add_argument("--role", required=True, choices=[r.value for r in accounts.Role])
    add.set_defaults(func=cmd_users_add)
    ulist = users_sub.add_parser("list", help="every account")
    ulist.add_argument("--json", action="store_true")
    ulist.set_defaults(func=cmd_users_list)
    for name, func, text in (("disable", cmd_users_disable, "disable an account"),
                             ("reset", cmd_users_reset, "new one-time password, unlock")):
        action = users_sub.add_parser(name, help=text)
        action.add_argument("name")
        action.set_defaults(func=func)

    sub.add_parser("web", help="serve the console for comms staff on web.bind"
                   ).set_defaults(func=cmd_web)

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
        use_format(settings.log.format)
        status: int = args.func(settings, args)
        return status
    except EmbargoError as exc:
        print(f"embargo: {exc}{hint_for(exc)}", file=sys.stderr)
        return status_for(exc, EXIT_STATUS)
    except DBAPIError as exc:  # e.g. the schema check, before any transaction
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        print(f"embargo: the database cannot be used: {first}", file=sys.stderr)
        return EXIT_STATUS[StorageError]
    except KeyboardInterrupt:
        print("embargo: interrupted; nothing half-done was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `embargo list | head`: the reader left; so do we, quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
