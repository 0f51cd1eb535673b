"""``embargo demo``: queue a small invented bundle a few seconds ahead, run the
scheduler with a countdown, and show what was published and who was told."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path

from config.settings import Settings
from jobs.app import build_services, start_node
from jobs.console import Countdown, Stopper, print_table
from release import keys as keyfile
from release.manifest import load_manifest
from release.pdf_text import text_pdf
from release.publishing import PublishStatus
from release.records import PUBLISHED
from release.service import ReleaseService

TITLE = "Open all hours? An inspection of out-of-hours access to public library services"

AUTHORITIES = (
    ("Northmoor Libraries", "northmoor", "Priya Raman", "Strong evidence that extended "
     "self-service hours reach people who work shifts; the booking system is not yet "
     "accessible to screen-reader users."),
    ("Eastwater Libraries", "eastwater", "Tom Okafor", "A clear plan for weekend opening, "
     "well understood by staff; the service does not yet measure who uses the late hours."),
    ("Kingsbridge City Libraries", "kingsbridge", "Morag Lindsay", "Good partnership with "
     "adult-education providers; staff rotas leave two branches closed on most Sundays."),
)

REPORT = """THE INSPECTORATE OF LIBRARY SERVICES (an invented body, for this demo)

{title}

National thematic report

Between February and May the inspectorate visited library services in every
region to ask three questions:

  - how well services reach people who cannot visit in ordinary hours;
  - how safely and reliably unstaffed opening is run;
  - how services learn who uses the extra hours, and who still does not.

Summary of findings

Most services now offer some access outside ordinary hours. Where it works
best, a library authority has asked residents first, trained staff to run the
unstaffed sessions, and measured who comes. Where it works least well, the
extra hours exist on paper but the building is hard to enter, the booking
system is hard to use, or nobody checks who benefits.

This report is embargoed until the time stated on the letter that
accompanies it.
"""

LETTER = """THE INSPECTORATE OF LIBRARY SERVICES (an invented body, for this demo)

To the Head of Service, {organisation}

Dear {first},

{title}

Enclosed is an embargoed copy of the national thematic report, which the
inspectorate will publish at the time shown below. It must not be published
or shared before then.

Findings that relate specifically to {organisation}:

  - {finding}

Yours sincerely,

The Chief Inspector of Library Services
Copied to: the liaison officer, {organisation}
"""


def _pdf(text: str) -> bytes:
    """The text as a PDF, wrapped at 80 columns, 50 lines a page, with a
    second page so the stamp can be seen on every page."""
    lines: list[str] = []
    for paragraph in text.splitlines():
        lines += textwrap.wrap(paragraph, 80) or [""]
    pages = [lines[i:i + 50] for i in range(0, len(lines), 50)]
    pages.append(["(This page is intentionally left blank apart from the embargo mark.)"])
    return text_pdf(pages)


def write_bundle(folder: Path) -> Path:
    """Write the demo documents and manifest into ``folder``; return the
    manifest's path."""
    (folder / "letters").mkdir(parents=True, exist_ok=True)
    (folder / "national-report.pdf").write_bytes(_pdf(REPORT.format(title=TITLE)))
    lines = [f'title = "{TITLE}"', 'publish_on = "2099-01-01"',
             'owner = "press-office@inspectorate.example"', "",
             "[[documents]]", 'path = "national-report.pdf"', 'kind = "report"', ""]
    for organisation, short, officer, finding in AUTHORITIES:
        (folder / "letters" / f"{short}.pdf").write_bytes(_pdf(LETTER.format(
            organisation=organisation, first=officer.split()[0], title=TITLE,
            finding=finding)))
        lines += ["[[documents]]", f'path = "letters/{short}.pdf"', 'kind = "letter"',
                  f'organisation = "{organisation}"', ""]
    for organisation, short, officer, _ in AUTHORITIES:
        lines += ["[[recipients]]", f'name = "{officer}"',
                  f'email = "liaison@{short}.libraries.example"',
                  f'organisation = "{organisation}"', ""]
    manifest = folder / "manifest.toml"
    manifest.write_text("\n".join(lines))
    return manifest


def run_demo(settings: Settings, *, seconds: int = 10, create_buckets: bool = False) -> int:

    out = sys.stdout
    if not (settings.keys_dir / keyfile.PRIVATE_NAME).exists():
        keyfile.init_keys(settings.keys_dir)
        print(f"created a publisher key pair in {settings.keys_dir}", file=out)
    if create_buckets:
        from storage.s3 import ensure_bucket, make_client

        client = make_client(settings)
        for location in (settings.vault, settings.public):
            if ensure_bucket(client, location.bucket):
                print(f"created bucket {location.bucket}", file=out)
        services = build_services(settings, s3_client=client, migrate_schema=True)
    else:
        services = build_services(settings, migrate_schema=True)
    # The demo's embargo is seconds away, well inside the usual copies.cutoff:
    # let its copies start up to 1 s before the instant so the officers'
    # marked copies can be seen going out first.
    services = dataclasses.replace(services, copies_cutoff=min(services.copies_cutoff,
                                                                timedelta(seconds=1)))
    service = ReleaseService(services, actor="demo")
    manifest = write_bundle(settings.data_dir / "demo-bundle")

    # The node starts first, and the countdown begins once it is ready: on a
    # slow or loaded machine the start-up must not eat into the copies' time.
    stopper = Stopper()
    stopper.install()
    published = threading.Event()
    release_id: list[str] = []
    scheduler = start_node(settings, services, stopper.event,
                           on_outcome=lambda o: published.set()
                           if o.release_id in release_id and o.status in
                           (PublishStatus.PUBLISHED, PublishStatus.FAILED) else None)
    try:
        now = services.clock.now()
        instant = (now + timedelta(seconds=max(2, seconds) + 1)).replace(microsecond=0)
        spec = load_manifest(manifest, publish_on=instant.isoformat(), zone=settings.zone)
        release = service.queue(spec)
    except BaseException:
        scheduler.shutdown()
        raise
    release_id.append(release.id)
    print(f"queued {release.id}: \"{release.title}\"\n  {len(release.documents)} documents "
          f"sealed into {settings.vault}, {release.recipient_count} liaison officers", file=out)
    print(f"  embargo {release.embargo}", file=out)
    try:
        with Countdown(out) as countdown:
            while not published.is_set() and not stopper.event.is_set():
                countdown.show((release.instant - services.clock.now()).total_seconds())
                published.wait(0.1)
        deadline = services.clock.now() + timedelta(seconds=10)
        while not stopper.event.is_set() and services.clock.now() < deadline:
            pending = [m for m in service.get(release.id).notices if m.delivered_at is None]
            if not pending:
                break
            stopper.event.wait(0.05)
    finally:
        interrupted = stopper.event.is_set()
        scheduler.shutdown()
    if interrupted:
        print(f"demo stopped before it finished; {release.id} stays queued, and the next "
              "`embargo run` (or demo) publishes it, late, or `embargo cancel` withdraws it",
              file=sys.stderr)
        return 130
    release = service.get(release.id)
    if release.state != PUBLISHED:
        print(f"embargo: demo release ended {release.state}: {release.reason}", file=sys.stderr)
        return 1
    print(f"published {release.lateness_ms:.1f} ms after the instant:", file=out)
    print_table([(d.filename, d.size, d.public_url) for d in release.documents],
                ["document", "bytes", "public at"], out=out)
    print("\nnotices:", file=out)
    print_table([(m.to, m.purpose, m.via or f"pending: {m.last_error}")
                 for m in release.notices], ["to", "purpose", "delivered to"], out=out)
    print(f"\nsee it all: embargo show {release.id}", file=out)
    return 0
