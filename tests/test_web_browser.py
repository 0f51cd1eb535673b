"""The console in a real browser: Debian's Chromium driven by Playwright
(never `playwright install`), against real `embargo web` and `embargo run`
processes. In CI (CI=true) a missing Chromium fails; elsewhere it skips.

The whole story: an editor signs in (changing the one-time password), builds
a release of a report and three letters with three officers a minute or two
ahead, submits it; an approver signs in and approves; the running scheduler
publishes; the release page shows it published, with the lateness and the
notices delivered. Screenshots of the main pages go to docs/console-*.png."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from config.errors import InputError
from release import timerules
from tests.conftest import MARKER, free_port, service_missing

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
LONDON = ZoneInfo("Europe/London")
PASSWORD = "correct horse battery"
# Screenshots go to the test's own folder; SCREENSHOTS=docs refreshes the README's.
SHOTS = os.environ.get("SCREENSHOTS", "")

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    base: str
    env: dict[str, str]
    data: Path
    procs: list[subprocess.Popen[bytes]]

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], env=self.env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def user(self, name: str, role: str) -> str:
        out = self.cli("users", "add", name, f"{name}@press.example", "--role", role)
        return out.strip().splitlines()[-1]


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        service_missing(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    port = free_port()
    base = f"http://localhost:{port}"
    data = tmp_path / "var"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")},
           "EMBARGO_DATA_DIR": str(data), "EMBARGO_WEB_BIND": f"127.0.0.1:{port}",
           "EMBARGO_WEB_BASE_URL": base, "EMBARGO_APPROVAL_REQUIRED": "true",
           "EMBARGO_WEB_MIN_LEAD": "10s", "EMBARGO_COPIES_CUTOFF": "5s",
           "EMBARGO_SCHEDULER_POLL_SECONDS": "0.2", "PYTHONPATH": str(ROOT)}
    stack = Stack(base=base, env=env, data=data, procs=[])
    stack.cli("keys", "init")
    web = stack.start("web")
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{base}/sign-in", timeout=1)
            break
        except httpx.TransportError:
            assert web.poll() is None and time.monotonic() < deadline, (
                web.stderr.read() if web.stderr else b"")
            time.sleep(0.1)
    try:
        yield stack
    finally:
        for proc in stack.procs:
            proc.terminate()
        for proc in stack.procs:
            proc.wait(15)


@pytest.fixture
def browser(chromium: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium))
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any) -> Any:
    context = browser.new_context(timezone_id="Europe/London", locale="en-GB",
                                  viewport={"width": 1200, "height": 900})
    return context.new_page()


def first_sign_in(page: Any, stack: Stack, name: str, one_time: str) -> None:
    page.goto(f"{stack.base}/releases")
    assert "/sign-in" in page.url
    page.fill("#name", name)
    page.fill("#password", one_time)
    page.click("button[type=submit]")
    page.wait_for_url("**/password")
    page.fill("#old", one_time)
    page.fill("#new", PASSWORD)
    page.fill("#again", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url("**/releases")


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = ROOT / SHOTS if SHOTS else tmp_path / "shots"
    folder.mkdir(exist_ok=True)
    return folder


def shot(page: Any, folder: Path, name: str) -> None:
    path = folder / f"console-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


def test_the_whole_story_in_a_browser(stack: Stack, browser: Any, tmp_path: Path,
                                      shots: Path) -> None:
    editor_pw, approver_pw = stack.user("edith", "editor"), stack.user("amir", "approver")
    stack.start("run")
    files = tmp_path / "bundle"
    files.mkdir()
    (files / "national-report.txt").write_text(f"National report {MARKER}\n" * 50)
    for i in (1, 2, 3):
        (files / f"force-{i}.txt").write_text(f"Letter to Force {i} {MARKER}\n" * 10)

    # The editor builds the release, a minute or two ahead.
    local = (datetime.now(UTC) + timedelta(seconds=90)).astimezone(LONDON)
    local = local.replace(second=0, microsecond=0) + timedelta(minutes=1)
    editor = new_page(browser)
    first_sign_in(editor, stack, "edith", editor_pw)
    editor.click("text=New release")
    editor.fill("#title", "Core business: a thematic inspection")
    editor.fill("#publish_on", local.strftime("%Y-%m-%d"))
    editor.fill("#at", local.strftime("%H:%M"))
    editor.fill("#officers", "\n".join(
        f"Liaison {i},liaison{i}@force{i}.police.example,Force {i}" for i in (1, 2, 3)))
    both = timerules.resolve(local.strftime("%Y-%m-%d"), at=local.strftime("%H:%M"),
                             zone="Europe/London", now=datetime.now(UTC)).describe_long()
    # shown as the user types (the script), and after a submit (without it)
    editor.wait_for_function("t => document.getElementById('instant').textContent === t",
                             arg=f"Publishes {both}")
    editor.click("button[value=check]")
    assert editor.inner_text("#instant") == f"Publishes {both}"
    shot(editor, shots, "new")
    editor.click("button[value=create]")
    editor.wait_for_selector("#upload")
    editor.set_input_files("#report", str(files / "national-report.txt"))
    for i in (1, 2, 3):
        assert editor.input_value(f"#letter_org_{i}") == f"Force {i}"
        editor.set_input_files(f"#letter_{i}", str(files / f"force-{i}.txt"))
    editor.click("#upload button[type=submit]")
    editor.wait_for_selector("text=force-3.txt")
    shot(editor, shots, "draft")
    editor.click("text=Review and submit")
    assert "Error:" not in editor.inner_text("main")
    assert editor.inner_text("#review-embargo") == both
    shot(editor, shots, "review")
    editor.click("#submit")
    editor.wait_for_selector("#state")
    assert editor.inner_text("#state") == "AWAITING APPROVAL"
    release_url = editor.url
    assert editor.locator("#approve").count() == 0  # an editor is offered no approval
    editor.click("text=Releases")
    shot(editor, shots, "releases")
    assert "text/javascript" not in editor.content()  # only the shipped script, by src
    countdown = editor.inner_text("time.countdown")
    assert re.fullmatch(r"\d\d:\d\d:\d\d", countdown), countdown

    # The approver approves.
    approver = new_page(browser)
    first_sign_in(approver, stack, "amir", approver_pw)
    approver.goto(release_url)
    shot(approver, shots, "approve")
    approver.click("#approve")
    approver.wait_for_selector("#state")
    assert approver.inner_text("#state") == "QUEUED"

    # The running scheduler publishes; the page, left alone, reloads itself
    # after the instant and while notices are pending, and shows it.
    from playwright.sync_api import Error as PlaywrightError

    deadline = time.monotonic() + (local - datetime.now(UTC)).total_seconds() + 60
    while time.monotonic() < deadline:
        try:
            published = approver.inner_text("#state", timeout=2000) == "PUBLISHED"
            pending = approver.locator("#notices td.pending").count()
            if published and approver.locator("#notices td.delivered").count() >= 4 \
                    and not pending:
                break
        except PlaywrightError:  # caught mid-reload
            pass
        time.sleep(1)
    approver.wait_for_load_state()
    assert approver.inner_text("#state") == "PUBLISHED"
    lateness = approver.inner_text("#lateness")
    assert re.fullmatch(r"\d+ ms", lateness) and int(lateness.split()[0]) < 5000, lateness
    notices = approver.inner_text("#notices")
    for i in (1, 2, 3):
        assert f"liaison{i}@force{i}.police.example\tpublished" in notices
    assert approver.locator("#notices td.pending").count() == 0
    assert approver.locator("a[href*='national-report.txt']").count() == 1
    shot(approver, shots, "release")
    audit = approver.inner_text("main")
    assert "release submitted\tedith" in audit and "release approved\tamir" in audit
    approver.click("text=Audit")
    assert approver.inner_text("#audit-result").startswith("Intact")
    approver.click("text=Nodes")
    assert "yes" in approver.inner_text("main table")
    shot(approver, shots, "nodes")


def test_a_dst_gap_time_is_refused_in_the_form(stack: Stack, browser: Any,
                                               shots: Path) -> None:
    password = stack.user("edith", "editor")
    page = new_page(browser)
    first_sign_in(page, stack, "edith", password)
    page.goto(f"{stack.base}/releases/new")
    page.fill("#title", "Spring forward")
    page.fill("#publish_on", "2027-03-28")
    page.fill("#at", "01:30")
    page.click("button[value=create]")
    with pytest.raises(InputError) as refused:
        timerules.resolve("2027-03-28", at="01:30", zone="Europe/London",
                          now=datetime.now(UTC))
    message = page.inner_text(".error-summary p")
    assert message == str(refused.value)
    assert "does not exist" in message and "BST" in message and "GMT" in message
    assert page.input_value("#at") == "01:30"  # what was typed stays on the form
    shot(page, shots, "gap")
