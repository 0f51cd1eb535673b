"""Fuzz `embargo queue`: generated manifests and flag values, seeded and bounded.

    python bench/fuzz_queue.py [--cases 10000] [--seed 13] [--show 5]

Each case is a manifest built from a valid one by one to four random
mutations (nasty text in any field: control characters, byte-order marks,
CR LF, lone surrogates, bidi overrides, over-long values; wrong types;
missing and unknown keys; nesting up to 2,000 deep; paths that do not exist,
are folders, have 300-byte parts or NULs; reserved, hidden, over-long and
case-colliding file names; unstampable PDFs; dates, times, zones and copy
times of every shape; raw bytes that are not TOML or not UTF-8), plus random
`--publish-on`, `--at`, `--zone` and `--copies-at` values. Every case runs
through `jobs.cli.main` in this process (not 10,000 subprocesses) against one
data dir with a key pair.

A case passes when it is queued (exit 0) or refused with exactly one line on
standard error and an exit status other than 0 and 1 (1 is what Python gives
an uncaught exception). Anything else (a traceback, exit 1, several lines)
is a failure, printed with its manifest; the script exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jobs.cli import main  # noqa: E402
from release import keys  # noqa: E402
from release.pdf_text import text_pdf  # noqa: E402

NASTY = ["\x00", "\r\n", "\n", "\x7f", "\ufeff", "\u2028", "\u202e", "\x85", "\t", "\x1b[31m",
         "\ud800", "é", "e\u0301", "𝔈", "💥", " ", "", "../", "/", "\\", ":", "%", "'", '"',
         "https://evil.example/login", "<script>", "\u0000\u0000"]
DATES = ["2099-01-01", "2099-12-31", "Thursday 4 September 2014", "2014-09-04", "2099-02-30",
         "2099-13-01", "9999-12-31", "0001-01-01", "Friday 1 January 2099",
         "Thursday 1 January 2099", "2099-03-29T01:30:00+00:00", "2099-01-01T00:00:00",
         "2099-01-01 00:01", "tomorrow", "", "2099-1-1", "1 Jan 2099", "2099-01-01T25:00Z",
         "99999-01-01", "2099-03-28"]
TIMES = ["00:01", "23:59", "24:00", "25:00", "00:60", "1:30", "01:30", "02:30", "noon", "",
         "00:01:00", "-1:00", "12:00 PM"]
ZONES = ["Europe/London", "America/New_York", "UTC", "Etc/GMT+14", "Mars/Olympus", "localtime",
         "posixrules", "", "../../etc/passwd", "Europe/London\x00", "Australia/Lord_Howe",
         "Pacific/Kiritimati", "America/Santiago"]
COPIES = ["2098-12-31 00:01", "2099-01-01 00:01", "2100-01-01 00:00", "2098-12-31T23:00:00Z",
          "yesterday", "", "2098-12-31 25:00", "1970-01-01 00:00"]


def nasty_text(rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.15:
        return rng.choice(["x", "é", "a b", "O"]) * rng.choice([199, 200, 201, 255, 256, 300,
                                                                 501, 2000])
    parts = [rng.choice(NASTY) if rng.random() < 0.5 else rng.choice(["Report", "Kent",
                                                                      "Officer", "a"])
             for _ in range(rng.randint(1, 5))]
    return "".join(parts)


def weird_value(rng: random.Random) -> Any:
    return rng.choice([
        lambda: nasty_text(rng), lambda: rng.randint(-10**12, 10**12), lambda: True,
        lambda: 3.5, lambda: [], lambda: ["a", 1], lambda: {}, lambda: {"x": "y"},
        lambda: deep(rng.randint(1, 40)),
    ])()


class Deep:
    """Lists nested ``depth`` deep around one string (written out flat, so
    the generator itself needs no recursion)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth


def deep(depth: int) -> Deep:
    return Deep(depth)


def base(folder: Path) -> dict[str, Any]:
    return {
        "title": "Core business: a fuzzed inspection",
        "publish_on": "2099-01-01",
        "owner": "press@inspectorate.example",
        "documents": [
            {"path": "report.pdf", "kind": "report"},
            {"path": "letters/kent.txt", "kind": "letter", "organisation": "Kent Police"},
            {"path": "letters/essex.txt", "kind": "letter", "organisation": "Essex Police"},
        ],
        "recipients": [
            {"name": "Kent liaison", "email": "liaison@kent.police.example",
             "organisation": "Kent Police"},
            {"name": "Essex liaison", "email": "liaison@essex.police.example",
             "organisation": "Essex Police"},
        ],
    }


PATHS = ["missing.txt", "letters", "letters/kent.txt", "bad.pdf", "not-a-pdf.pdf",
         "p" * 300 + "/x.txt", "letters/" + "q" * 256 + ".txt", "/etc/hostname", "../outside",
         "", "letters/\x00.txt", "MANIFEST.JSON", ".hidden.txt", "report.pdf", "empty.txt",
         "~/nothing", "letters/../letters/essex.txt", "con", "a:b.txt"]
NAMES = ["manifest.json", "Manifest.Json", ".htaccess", "r" * 260 + ".pdf", "é" * 128,
         "KENT.TXT", "kent.txt", "x/y.pdf", "..", "nul\x00.pdf", "ok.pdf", "a\r\nb.pdf"]
KEYS = ["title", "publish_on", "at", "zone", "owner", "copies_at", "documents", "recipients",
        "colour"]


def mutate(rng: random.Random, manifest: dict[str, Any]) -> None:
    kind = rng.randrange(14)
    docs = manifest.get("documents")
    people = manifest.get("recipients")
    if kind == 0:
        manifest[rng.choice(["title", "owner"])] = weird_value(rng)
    elif kind == 1 and isinstance(docs, list) and docs:
        doc = rng.choice(docs)
        if isinstance(doc, dict):
            doc[rng.choice(["path", "kind", "organisation", "name", "content_type",
                            "extra"])] = weird_value(rng)
    elif kind == 2 and isinstance(docs, list) and docs:
        doc = rng.choice(docs)
        if isinstance(doc, dict):
            doc["path"] = rng.choice(PATHS)
    elif kind == 3 and isinstance(docs, list) and docs:
        doc = rng.choice(docs)
        if isinstance(doc, dict):
            doc["name"] = rng.choice(NAMES)
    elif kind == 4 and isinstance(people, list) and people:
        person = rng.choice(people)
        if isinstance(person, dict):
            person[rng.choice(["name", "email", "organisation", "phone"])] = weird_value(rng)
    elif kind == 5:
        manifest.pop(rng.choice(KEYS), None)
    elif kind == 6:
        manifest[rng.choice(KEYS)] = deep(rng.choice([5, 50, 500, 999, 2000]))
    elif kind == 7:
        manifest["publish_on"] = rng.choice(DATES)
    elif kind == 8:
        manifest["at"] = rng.choice(TIMES)
    elif kind == 9:
        manifest["zone"] = rng.choice(ZONES)
    elif kind == 10:
        manifest["copies_at"] = rng.choice(COPIES)
    elif kind == 11 and isinstance(docs, list):
        docs.append(rng.choice([{"path": "letters/kent.txt", "kind": "report"},
                                {"path": "bad.pdf", "kind": "report"},
                                {"path": "report.pdf", "kind": "report", "name": "REPORT.pdf"},
                                "not a table", 7]))
    elif kind == 12 and isinstance(people, list):
        first = people[0] if people and isinstance(people[0], dict) else {}
        people.append(rng.choice([dict(first), {"name": "x"}, [], 1]))
    else:
        manifest[rng.choice(KEYS)] = weird_value(rng)


def toml_value(value: Any) -> str:
    if isinstance(value, Deep):
        return "[" * value.depth + '"leaf"' + "]" * value.depth
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(manifest: dict[str, Any]) -> str:
    lines = []
    tables: list[tuple[str, list[Any]]] = []
    for key, value in manifest.items():
        if key in ("documents", "recipients") and isinstance(value, list) and value and all(
                isinstance(v, dict) for v in value):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    for key, rows in tables:
        for row in rows:
            lines.append(f"\n[[{key}]]")
            lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in row.items())
    return "\n".join(lines) + "\n"


def write_case(rng: random.Random, folder: Path, number: int) -> tuple[Path, list[str]]:
    path = folder / f"case-{number}.toml"
    if rng.random() < 0.04:  # not TOML, or not UTF-8, at all
        path.write_bytes(rng.choice([bytes(rng.randrange(256) for _ in range(200)),
                                     b'title = "unterminated\n', b"\xff\xfe\x00t",
                                     b"[[documents]\n", b"x = " + b"[" * 5000]))
    else:
        manifest = base(folder)
        for _ in range(rng.randint(1, 4)):
            mutate(rng, manifest)
        path.write_text(to_toml(manifest), encoding="utf-8", errors="surrogatepass")
    flags: list[str] = []
    for flag, pool in (("--publish-on", DATES), ("--at", TIMES), ("--zone", ZONES),
                       ("--copies-at", COPIES)):
        if rng.random() < 0.12:
            value = rng.choice(pool) if rng.random() < 0.7 else nasty_text(rng)
            flags.append(f"{flag}={value}")
    return path, flags


def make_files(folder: Path) -> None:
    (folder / "letters").mkdir(parents=True)
    (folder / "report.pdf").write_bytes(text_pdf([["National report"], ["page 2"]]))
    (folder / "letters" / "kent.txt").write_text("Letter to Kent\n")
    (folder / "letters" / "essex.txt").write_text("Letter to Essex\n")
    (folder / "empty.txt").write_bytes(b"")
    (folder / ".hidden.txt").write_text("hidden\n")
    good = text_pdf([["x"]])
    (folder / "bad.pdf").write_bytes(good.replace(b"/MediaBox [ 0.0 0.0 595 842 ]",
                                                  b"/MediaBox null                 "))
    (folder / "not-a-pdf.pdf").write_text("plain text\n")


def _kind(line: str) -> str:
    """A refusal's message with its particulars (paths, quoted values,
    numbers) taken out, to count the kinds of refusal."""
    import re

    line = re.sub(r"/\S*?(case-\d+\.toml|bundle)\S*", "<path>", line)
    line = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "<value>", line)
    line = re.sub(r"\d+", "N", line)
    return line[:110]


def run_case(data_dir: Path, manifest: Path, flags: list[str]) -> tuple[int | str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status: int | str = main(["--data-dir", str(data_dir), "queue", str(manifest),
                                      *flags])
    except SystemExit as exc:  # argparse
        status = f"SystemExit({exc.code})"
    except BaseException as exc:
        status = f"{type(exc).__name__}: {exc}"
    return status, err.getvalue()


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--show", type=int, default=5, help="failures to print in full")
    parser.add_argument("--top", type=int, default=15, help="kinds of refusal to list")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    # Library log records (pypdf on the bad PDFs) go nowhere rather than
    # into the redirected standard error of whichever case ran first.
    logging.basicConfig(handlers=[logging.NullHandler()], level=logging.CRITICAL)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    failures: list[tuple[int, str, str, list[str], str]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="embargo-fuzz-") as tmp:
        root = Path(tmp)
        data_dir, bundle = root / "var", root / "bundle"
        make_files(bundle)
        keys.init_keys(data_dir / "keys")
        for number in range(args.cases):
            manifest, flags = write_case(rng, bundle, number)
            status, err = run_case(data_dir, manifest, flags)
            lines = err.strip().splitlines()
            if status == 0:
                counts["queued"] += 1
            elif isinstance(status, int) and status != 1 and len(lines) == 1 \
                    and lines[0].startswith("embargo: "):
                counts["refused"] += 1
                reasons[f"exit {status}"] += 1
                kinds[_kind(lines[0])] += 1
            else:
                counts["FAILED"] += 1
                failures.append((number, str(status), manifest.read_text(
                    encoding="utf-8", errors="replace")[:600], flags, err[-800:]))
            manifest.unlink()
    elapsed = time.monotonic() - started
    print(f"fuzz_queue: {args.cases} cases, seed {args.seed}, {elapsed:.0f} s")
    print(f"{'outcome':<12}{'cases':>8}")
    for name in ("queued", "refused", "FAILED"):
        print(f"{name:<12}{counts[name]:>8}")
    print("refusals by exit status: " + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())))
    print(f"\nmost common refusals (of {len(kinds)} kinds):")
    for kind, n in kinds.most_common(args.top):
        print(f"{n:>7}  {kind}")
    for number, status, text, flags, err in failures[:args.show]:
        print(f"\n--- case {number}: {status}; flags {flags}\n{text}\n{err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main_())
