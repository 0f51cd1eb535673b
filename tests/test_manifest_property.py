"""Property: whatever a manifest holds, loading it gives a release spec or
one InputError; queueing it through the command line exits 0, or non-zero
other than 1 with one line. Never a traceback. (bench/fuzz_queue.py runs
10,000 seeded cases of the same kind; this is the bounded version in CI.)"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.errors import InputError
from jobs.cli import main
from release import keys
from release.manifest import ReleaseSpec, load_manifest

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.sampled_from(
    ["\x00", "a\r\nb", "\ufeffx", "x" * 201, "r" * 260 + ".pdf", "manifest.json", ".x",
     "report.txt", "REPORT.TXT", "letters/kent.txt", "p" * 300 + "/x", "Kent Police",
     "2099-01-01", "00:01", "25:00", "Europe/London", "Mars/Base", "a@b.example",
     "liaison@kent.police.example", "report", "letter"])
LEAF = TEXT | st.integers() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
VALUE = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
DOC_KEYS = ["path", "kind", "organisation", "name", "content_type", "extra"]
PERSON_KEYS = ["name", "email", "organisation", "phone"]
TOP = ["title", "publish_on", "at", "zone", "owner", "copies_at", "colour"]


def _table(keys_: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys_), VALUE, max_size=len(keys_))


MANIFEST = st.fixed_dictionaries(
    {"title": VALUE | st.just("A title"), "publish_on": VALUE | st.just("2099-01-01")},
    optional={k: VALUE for k in TOP if k not in ("title", "publish_on")},
).flatmap(lambda top: st.fixed_dictionaries({
        "top": st.just(top),
        "documents": st.lists(_table(DOC_KEYS) | st.just({"path": "report.txt",
                                                          "kind": "report"}), max_size=3),
        "recipients": st.lists(_table(PERSON_KEYS), max_size=2),
        "depth": st.sampled_from([0, 0, 0, 3, 6, 1200]),
    }))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {_value(v)}"
                           for k, v in value.items()) + "}"


def _toml(case: dict[str, Any]) -> str:
    lines = [f"{json.dumps(k)} = {_value(v)}" for k, v in case["top"].items()]
    if case["depth"]:
        lines.append("nested = " + "[" * case["depth"] + "1" + "]" * case["depth"])
    for key in ("documents", "recipients"):
        for row in case[key]:
            lines.append(f"[[{key}]]")
            lines += [f"{json.dumps(k)} = {_value(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("property")
    (path / "report.txt").write_text("report\n")
    (path / "letters").mkdir()
    (path / "letters" / "kent.txt").write_text("letter\n")
    keys.init_keys(path / "var" / "keys")
    return path


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(MANIFEST)
def test_loading_any_manifest_gives_a_spec_or_one_input_error(folder: Path,
                                                              case: dict[str, Any]) -> None:
    path = folder / "manifest.toml"
    path.write_text(_toml(case), encoding="utf-8", errors="surrogatepass")
    try:
        spec = load_manifest(path)
    except InputError as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc)
    else:
        assert isinstance(spec, ReleaseSpec)
        for text in (spec.title, *(d.filename for d in spec.documents),
                     *(r.name for r in spec.recipients)):
            assert text.isprintable()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(MANIFEST, st.lists(st.tuples(st.sampled_from(["--publish-on", "--at", "--zone",
                                                     "--copies-at"]), TEXT), max_size=2))
def test_queueing_any_manifest_is_queued_or_one_line_never_exit_1(
        folder: Path, case: dict[str, Any], flags: list[tuple[str, str]]) -> None:
    path = folder / "manifest.toml"
    path.write_text(_toml(case), encoding="utf-8", errors="surrogatepass")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(["--data-dir", str(folder / "var"), "queue", str(path),
                       *(f"{flag}={value}" for flag, value in flags)])
    if status != 0:
        assert status != 1
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("embargo: "), err.getvalue()
