"""SIGKILL a publisher around the embargo instant, resume, and count.

    python bench/kill_loop.py [--trials 50] [--letters 43]

Each trial queues the seed-shaped bundle (a 5 MiB report and 43 letters of
100 KiB) a few seconds ahead, starts a publisher in its own process
(tests/publisher_child.py), SIGKILLs it at a random moment between 0.5 s
before and 1 s after the instant, then lets a second publisher take over
once the lease lapses. It then counts, from the public folder itself and the
database: documents missing; documents written twice (a public file whose
inode changed after the kill, or more than one ``release_published``, or a
notice queued twice); anything under the public root that is not a
published document or the manifest (a decrypted leftover); anything early
(a public file whose change time is before the instant by more than the file
clock's lag: Linux stamps files from its coarse clock, up to a scheduler tick
behind the true time, measured in the same run as publish_latency does; the
earliest stamp against the instant is shown beside). Prints a table."""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import file_clock, table, write_bundle  # noqa: E402
from config.settings import load_settings  # noqa: E402
from jobs.app import build_services  # noqa: E402
from release.keys import init_keys  # noqa: E402
from release.manifest import load_manifest  # noqa: E402
from release.records import OutboxMessage  # noqa: E402
from release.service import ReleaseService  # noqa: E402


def trial(work: Path, bundle: Path, rng: random.Random, lease: float,
          lag: float) -> dict[str, object]:
    data_dir = work / "var"
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir)})
    init_keys(settings.keys_dir)
    services = build_services(settings)
    instant = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    release = ReleaseService(services, actor="bench").queue(
        load_manifest(bundle, publish_on=instant.isoformat()))
    command = [sys.executable, "-m", "tests.publisher_child", str(data_dir),
               settings.database_url, release.id]
    child = subprocess.Popen([*command, "doomed", "--lease", str(lease)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_at = instant.timestamp() + rng.uniform(-0.5, 1.0)
    time.sleep(max(0.0, kill_at - time.time()))
    child.send_signal(signal.SIGKILL)
    status = child.wait()
    killed = "killed" if status == -signal.SIGKILL else (child.stdout.read().strip()
                                                        if child.stdout else str(status))
    root = settings.public.path
    assert root is not None
    folder = root / release.slug
    after_kill = {p.name: p.stat().st_ino for p in folder.iterdir()} if folder.is_dir() else {}
    time.sleep(lease + 0.3)
    resumed = subprocess.run([*command, "resumer", "--lease", str(lease)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    names = {d.filename: d.sha256 for d in release.documents}
    expected = set(names) | {"manifest.json"}
    import hashlib
    present = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    missing = sum(1 for n in names if f"{release.slug}/{n}" not in present)
    leftovers = sum(1 for key in present if key.split("/")[-1] not in expected
                    or not key.startswith(release.slug + "/"))
    wrong = sum(1 for n, digest in names.items() if f"{release.slug}/{n}" in present
                and hashlib.sha256(present[f"{release.slug}/{n}"].read_bytes()).hexdigest()
                != digest)
    stamps = [p.stat().st_ctime - instant.timestamp() for p in present.values()]
    early = sum(1 for at in stamps if at < -lag)
    first_stamp = min(stamps, default=0.0) * 1000
    replaced = sum(1 for n, ino in after_kill.items()
                   if (folder / n).exists() and (folder / n).stat().st_ino != ino)
    events = [e.action for e in ReleaseService(services, actor="bench").get(release.id).events]
    with services.sessions() as session:
        notices = Counter(m.to_addr for m in session.query(OutboxMessage).filter(
            OutboxMessage.release_id == release.id,
            OutboxMessage.purpose.in_(("published", "owner_summary"))))
    twice = replaced + max(0, events.count("release_published") - 1) + sum(
        n - 1 for n in notices.values())
    staged_left = services.public.staging.root
    staging_files = sum(1 for p in staged_left.rglob("*") if p.is_file()) \
        if staged_left.exists() else 0
    swept = services.public.sweep_staging()
    services.engine.dispose()
    return {"first": killed, "resumed": resumed.stdout.strip() or resumed.stderr[-200:],
            "public_after_kill": len(after_kill), "missing": missing, "twice": twice,
            "leftovers": leftovers + wrong, "early": early, "staging_files": staging_files,
            "swept": swept, "offset": kill_at - instant.timestamp(),
            "first_stamp_ms": first_stamp}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--letters", type=int, default=43)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="embargo-kill-"))
    bundle, _ = write_bundle(base / "bundle", letters=args.letters)
    clock = file_clock(base / "clock")
    print(clock.describe(), flush=True)
    lag = clock.max_lag_ms / 1000
    rows = []
    totals = Counter[str]()
    try:
        for n in range(args.trials):
            work = base / f"t{n}"
            result = trial(work, bundle, rng, args.lease, lag)
            shutil.rmtree(work, ignore_errors=True)
            for key in ("missing", "twice", "leftovers", "early"):
                totals[key] += int(result[key])  # type: ignore[call-overload]
            totals["published"] += result["resumed"] in ("published", "inactive")
            rows.append((n, f"{result['offset']:+.3f}", result["first"],
                         result["public_after_kill"], result["staging_files"],
                         result["resumed"], result["missing"], result["twice"],
                         result["leftovers"], result["early"],
                         f"{result['first_stamp_ms']:+.2f}"))
            print(*rows[-1], flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(table(rows, ["#", "kill (s from instant)", "first", "public at kill",
                       "staged files left (outside public)", "resumer", "missing", "twice",
                       "leftovers", f"early (> {clock.max_lag_ms:.2f} ms file clock lag)",
                       "first stamp (ms from instant)"], title="SIGKILL around the instant"))
    print(f"\ntrials {args.trials}: published {totals['published']}, missing "
          f"{totals['missing']}, written twice {totals['twice']}, decrypted leftovers under "
          f"the public root {totals['leftovers']}, early {totals['early']} (beyond the "
          f"file clock's lag, {clock.max_lag_ms:.2f} ms)")
    return 0 if not (totals["missing"] or totals["twice"] or totals["leftovers"]
                     or totals["early"]) else 1


if __name__ == "__main__":
    sys.exit(main())
