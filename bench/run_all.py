"""Every issue-16 benchmark in one go: each table as printed, and a markdown
summary (figure, target, limit, measured, verdict, commit) to paste into
bench/RESULTS.md.

    python bench/run_all.py [--quick] [--out FILE] [--only a,b] [--set KEY=VALUE ...]

Runs, one after the other, each in its own process group: publish_latency.py
(folder and S3 seed bundle, notices), burst.py (100 releases at one instant),
queue_many.py, seal.py and staging_memory.py; a script that is not there is
reported "not run: missing". Trial counts are chosen so that the whole run
takes about 12 minutes on a 2-core machine (--quick: about 3). A script that
runs past its time limit is stopped and reported as such.

The summary rows come from each script's own verdicts: a script that calls
_common.emit_summary (the file named by $BENCH_SUMMARY) gives its rows with
limit and measured figures; for one that does not, every printed table row
that ends in a verdict (MET / NOT MET) becomes a row. --set passes settings to
the scripts that take --set (publish_latency, burst).

Ctrl-C or SIGTERM stops the running script (which removes its own temporary
folders and children) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import REPO, SUMMARY_ENV, Cleanup, commit_id, machine

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    script: str
    owner: str
    full: tuple[str, ...]  # arguments for the full run
    quick: tuple[str, ...]  # … for --quick
    limit_s: float  # stopped after this long (full run; quick: a third, at least 120 s)
    takes_set: bool = False


BENCHES = (
    Bench("publish_latency.py", "H5", ("--trials", "20"), ("--trials", "3"), 420, True),
    Bench("burst.py", "H5", ("--trials", "12"), ("--trials", "2"), 180, True),
    Bench("queue_many.py", "H4", ("--trials", "3"), ("--quick",), 240),
    Bench("seal.py", "H4", ("--trials", "10"), ("--quick",), 150),
    Bench("staging_memory.py", "H4", (), ("--quick",), 150),
)


@dataclass
class Outcome:
    bench: Bench
    status: str  # "ran", "not run: missing", "stopped: ...", "failed (exit N)"
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)


def _help(script: Path) -> str:
    """``script --help``: which options this version of the script knows."""
    try:
        done = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    except subprocess.SubprocessError:
        return ""
    return done.stdout


def _arguments(bench: Bench, script: Path, quick: bool, settings: list[str]) -> list[str]:
    known = _help(script)
    wanted = list(bench.quick if quick else bench.full)
    args: list[str] = []
    i = 0
    while i < len(wanted):  # pass only the options this version of the script knows
        option = wanted[i]
        takes_value = i + 1 < len(wanted) and not wanted[i + 1].startswith("--")
        if option in known:
            args += wanted[i:i + 2] if takes_value else [option]
        i += 2 if takes_value else 1
    if bench.takes_set and settings and "--set" in known:
        for item in settings:
            args += ["--set", item]
    return args


VERDICT_AT_END = re.compile(r"\s(NOT MET|MET|\(NOT MET\)|\(MET\)|UNDECIDED.*)\s*$")


def _rows_from_output(bench: Bench, lines: list[str], commit: str) -> list[dict[str, str]]:
    """Fallback: every printed table row that ends in a verdict."""
    rows = []
    for line in lines:
        match = VERDICT_AT_END.search(line)
        if not match or line.lstrip().startswith(("-", "limit")):
            continue
        text = re.sub(r"\s{2,}", " | ", line[:match.start()].strip())
        rows.append({"bench": bench.script.removesuffix(".py"), "commit": commit,
                     "figure": text, "target": "(in the row)", "limit": "",
                     "measured": "(in the row)", "verdict": match.group(1)})
    return rows


def run_one(cleanup: Cleanup, bench: Bench, quick: bool, settings: list[str],
            work: Path, commit: str) -> Outcome:
    script = HERE / bench.script
    if not script.exists():
        return Outcome(bench, "not run: missing")
    args = _arguments(bench, script, quick, settings)
    summary = work / f"{script.stem}.jsonl"
    env = dict(os.environ)
    env[SUMMARY_ENV] = str(summary)
    env["PYTHONUNBUFFERED"] = "1"
    limit = max(120.0, bench.limit_s / 3) if quick else bench.limit_s
    print(f"\n===== {bench.script} {' '.join(args)} (stopped after {limit:.0f} s) =====",
          flush=True)
    out = Outcome(bench, "ran")
    began = time.monotonic()
    proc = cleanup.spawn([sys.executable, str(script), *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1)
    assert proc.stdout is not None
    stream = proc.stdout

    def echo() -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            print(line, flush=True)
            out.output.append(line)

    reader = threading.Thread(target=echo, name=f"echo-{script.stem}", daemon=True)
    reader.start()
    while proc.poll() is None:
        if time.monotonic() - began > limit:
            out.status = f"stopped: past its {limit:.0f} s limit"
            cleanup.stop(proc)
            break
        time.sleep(0.1)
    reader.join(10)
    out.seconds = time.monotonic() - began
    code = cleanup.stop(proc)  # gone already: only closes its pipe
    if out.status == "ran" and code != 0:
        out.status = f"failed (exit {code})"
    if summary.exists():
        out.rows = [json.loads(line) for line in summary.read_text().splitlines() if line]
    if not out.rows:
        out.rows = _rows_from_output(bench, out.output, commit)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(outcomes: list[Outcome], quick: bool, took: float, header: str) -> str:
    lines = [f"# bench/run_all.py{' --quick' if quick else ''}", "",
             f"{header}; whole run {took / 60:.1f} min", "",
             "| bench | figure | target | limit (same run) | measured | verdict | commit |",
             "|---|---|---|---|---|---|---|"]
    for out in outcomes:
        name = out.bench.script.removesuffix(".py")
        if out.status != "ran":
            lines.append(f"| {name} | ({out.bench.owner}) | | | | {_cell(out.status)} | |")
        for row in out.rows:
            lines.append("| " + " | ".join(_cell(str(row.get(k, ""))) for k in (
                "bench", "figure", "target", "limit", "measured", "verdict", "commit")) + " |")
    lines += ["", "Run times: " + ", ".join(
        f"{o.bench.script} {o.status if o.status != 'ran' else f'{o.seconds:.0f} s'}"
        for o in outcomes), ""]
    for out in outcomes:
        if not out.output:
            continue
        lines += [f"## {out.bench.script}", "", "```"]
        # the tables as printed: from the report's first line (after the progress lines)
        start = next((i for i, line in enumerate(out.output)
                      if line.startswith(out.bench.script.removesuffix(".py") + " —")), 0)
        lines += out.output[start:]
        lines += ["```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few trials: about 3 minutes")
    parser.add_argument("--out", default=str(HERE / "last-run.md"),
                        help="the markdown summary (default bench/last-run.md)")
    parser.add_argument("--only", default="", help="comma-separated script names to run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the embargo children of publish_latency and burst")
    args = parser.parse_args()
    only = {name.strip().removesuffix(".py") for name in args.only.split(",") if name.strip()}
    chosen = [b for b in BENCHES if not only or b.script.removesuffix(".py") in only]
    commit = commit_id()
    header = f"machine: {machine()}"
    began = time.monotonic()
    outcomes: list[Outcome] = []
    with Cleanup() as cleanup:
        work = cleanup.tempdir("run-all")
        try:
            for bench in chosen:
                outcomes.append(run_one(cleanup, bench, args.quick, args.set, work, commit))
        finally:
            took = time.monotonic() - began
            text = markdown(outcomes, args.quick, took, header)
            Path(args.out).write_text(text + "\n")
    print("\n===== summary =====")
    print(text.split("\n## ", 1)[0])
    print(f"written to {args.out}")
    return 0 if all(o.status in ("ran", "not run: missing") for o in outcomes) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the running benchmark was stopped", file=sys.stderr)
        sys.exit(130)
