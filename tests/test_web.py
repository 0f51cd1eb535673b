"""The console's routes, through httpx's ASGI transport: sign-in, sessions,
CSRF and Origin, roles on every route, the error mapping, escaping, and
building a release from draft to approval with streamed, sealed uploads."""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from config.errors import InputError
from config.settings import Settings, load_settings
from jobs.app import build_services
from release import accounts, timerules
from release.keys import init_keys
from release.records import Document, Release
from release.service import ReleaseService, Services
from tests.conftest import MARKER, FakeClock
from web.app import create_app

BASE = "http://localhost:8080"
NOW = datetime(2014, 9, 1, 9, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"
ROLES = ("editor", "approver", "viewer", "admin")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "approval.required": True,
                                                    "web.base_url": BASE})
    init_keys(settings.keys_dir)
    return settings


@pytest.fixture(autouse=True)
def cheap_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id still, with the smallest cost, so that each test does not
    spend seconds hashing (the real cost is the library's default)."""
    from argon2 import PasswordHasher

    monkeypatch.setattr(accounts, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8,
                                                            parallelism=1))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def services(settings: Settings, clock: FakeClock) -> Iterator[Services]:
    services = dataclasses.replace(build_services(settings), clock=clock)
    yield services
    services.engine.dispose()


def make_user(services: Services, name: str, role: str, *, change: bool = True) -> str:
    """An account with PASSWORD (or its one-time password when ``change`` is false)."""
    _, one_time = accounts.add_user(services, name=name, email=f"{name}@press.example",
                                    role=role, actor="admin-cli")
    if not change:
        return one_time
    who = accounts.sign_in(services, name, one_time, now=services.clock.now())
    accounts.change_password(services, who, old=one_time, new=PASSWORD,
                             now=services.clock.now())
    accounts.sign_out(services, who.session_id, now=services.clock.now())
    return PASSWORD


class Client:
    """One browser: its own cookies; POSTs carry the console's Origin and the
    page's CSRF token unless told otherwise."""

    def __init__(self, app: Any) -> None:
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                      headers={"origin": BASE})
        self.csrf = ""

    async def get(self, path: str) -> httpx.Response:
        response = await self.http.get(path)
        found = re.search(r'name="csrf" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    async def post(self, path: str, data: dict[str, str] | None = None, *,
                   csrf: str | None = None, **kw: Any) -> httpx.Response:
        form = {"csrf": self.csrf if csrf is None else csrf, **(data or {})}
        if csrf == "omit":
            del form["csrf"]
        return await self.http.post(path, data=form, **kw)

    async def sign_in(self, name: str, password: str = PASSWORD) -> httpx.Response:
        return await self.http.post("/sign-in", data={"name": name, "password": password})


@pytest.fixture
async def app(settings: Settings, services: Services) -> Any:
    return create_app(settings, services=services)


@pytest.fixture
async def users(services: Services) -> dict[str, str]:
    return {role: make_user(services, role, role) for role in ROLES}


async def signed_in(app: Any, name: str) -> Client:
    client = Client(app)
    response = await client.sign_in(name)
    assert response.status_code == 303, response.text
    await client.get("/releases")
    return client


def multipart(csrf: str | None, parts: list[tuple[str, str | None, bytes]],
              boundary: str = "xyzBOUNDARYxyz") -> tuple[bytes, str]:
    """A multipart body of (name, filename or None, content) parts, in order."""
    out = bytearray()
    if csrf is not None:
        parts = [("csrf", None, csrf.encode()), *parts]
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: text/plain\r\n"
        out += b"\r\n" + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


OFFICERS = "\n".join(f"Liaison {i},liaison{i}@force{i}.police.example,Force {i}"
                     for i in (1, 2, 3))


def bundle_parts() -> list[tuple[str, str | None, bytes]]:
    parts: list[tuple[str, str | None, bytes]] = [
        ("report", "national-report.txt", f"National report {MARKER}\n".encode() * 100)]
    for i in (1, 2, 3):
        parts += [(f"letter_org_{i}", None, f"Force {i}".encode()),
                  (f"letter_{i}", f"force-{i}.txt", f"Letter to Force {i} {MARKER}\n".encode())]
    return parts


async def new_draft(client: Client, **fields: str) -> str:
    await client.get("/releases/new")
    data = {"title": "Core business", "publish_on": "2014-09-04", "at": "00:01",
            "zone": "Europe/London", "officers": OFFICERS, "action": "create", **fields}
    response = await client.post("/releases/new", data, files={"none": ("", b"")})
    assert response.status_code == 303, response.text
    return response.headers["location"].rsplit("/", 1)[1]


async def upload(client: Client, release_id: str,
                 parts: list[tuple[str, str | None, bytes]] | None = None,
                 csrf: str | None = None) -> httpx.Response:
    body, content_type = multipart(client.csrf if csrf is None else csrf or None,
                                   bundle_parts() if parts is None else parts)
    return await client.http.post(f"/releases/{release_id}/documents", content=body,
                                  headers={"content-type": content_type})


async def ready_draft(client: Client) -> str:
    release_id = await new_draft(client)
    await client.get(f"/releases/{release_id}")
    assert (await upload(client, release_id)).status_code == 303
    return release_id


async def submitted(client: Client) -> str:
    release_id = await ready_draft(client)
    await client.get(f"/releases/{release_id}/review")
    response = await client.post(f"/releases/{release_id}/submit")
    assert response.status_code == 303, response.text
    return release_id


# -- headers, sign-in, sessions --------------------------------------------------------------
async def test_security_headers_on_every_response(app: Any, users: dict[str, str]) -> None:
    client = Client(app)
    for response in (await client.get("/sign-in"), await client.get("/releases"),
                     await client.get("/static/console.css"),
                     await client.http.post("/sign-in", data={"name": "x", "password": "y"})):
        csp = response.headers["content-security-policy"]
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp
        assert response.headers["referrer-policy"] == "no-referrer"
    editor = await signed_in(app, "editor")
    missing = await editor.get("/releases/rel_nope00000000")
    assert missing.status_code == 404 and "content-security-policy" in missing.headers


async def test_cookie_is_httponly_strict_and_secure_off_localhost(
        settings: Settings, services: Services, users: dict[str, str]) -> None:
    local = create_app(settings, services=services)
    cookie = (await Client(local).sign_in("editor")).headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    proxied = load_settings(environ={}, overrides={
        "data_dir": str(settings.data_dir), "web.base_url": "https://console.example"})
    app = create_app(proxied, services=services)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                               base_url="https://console.example",
                               headers={"origin": "https://console.example"})
    response = await client.post("/sign-in", data={"name": "editor", "password": PASSWORD})
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith("__host-embargo=") and "; secure" in cookie
    assert "httponly" in cookie and "samesite=strict" in cookie


async def test_unknown_name_and_wrong_password_get_the_same_refusal(
        app: Any, users: dict[str, str]) -> None:
    client = Client(app)
    unknown = await client.sign_in("nobody", PASSWORD)
    wrong = await client.sign_in("editor", "not the password")
    assert unknown.status_code == wrong.status_code == 401
    assert html.escape(accounts.SIGN_IN_REFUSED, quote=True) in unknown.text
    assert unknown.text.replace('value="nobody"', "") == wrong.text.replace('value="editor"', "")


async def test_the_sixth_attempt_is_refused_even_with_the_right_password(
        app: Any, users: dict[str, str], clock: FakeClock) -> None:
    client = Client(app)
    for _ in range(5):
        assert (await client.sign_in("editor", "wrong password!")).status_code == 401
    assert (await client.sign_in("editor", PASSWORD)).status_code == 401
    clock.set(NOW + accounts.LOCK_FOR - timedelta(microseconds=1))
    assert (await client.sign_in("editor", PASSWORD)).status_code == 401
    clock.set(NOW + accounts.LOCK_FOR)
    assert (await client.sign_in("editor", PASSWORD)).status_code == 303


async def test_after_sign_in_it_goes_on_to_the_page_asked_for_on_this_console_only(
        app: Any, users: dict[str, str]) -> None:
    client = Client(app)
    asked = await client.get("/audit")
    assert asked.headers["location"] == "/sign-in?next=/audit"
    page = await client.get(asked.headers["location"])
    assert 'name="next" value="/audit"' in page.text
    for wanted, going in (("/audit", "/audit"), ("//evil.example/x", "/releases"),
                          ("https://evil.example/", "/releases")):
        response = await client.http.post("/sign-in", data={
            "name": "viewer", "password": PASSWORD, "next": wanted})
        assert response.headers["location"] == going


async def test_four_failures_then_success_does_not_lock(app: Any, users: dict[str, str]) -> None:
    client = Client(app)
    for _ in range(4):
        await client.sign_in("editor", "wrong password!")
    assert (await client.sign_in("editor", PASSWORD)).status_code == 303


async def test_first_sign_in_must_change_the_one_time_password(
        app: Any, services: Services) -> None:
    one_time = make_user(services, "newbie", "editor", change=False)
    client = Client(app)
    response = await client.sign_in("newbie", one_time)
    assert response.headers["location"] == "/password"
    assert (await client.get("/releases")).headers["location"] == "/password"
    await client.get("/password")
    short = await client.post("/password", {"old": one_time, "new": "short", "again": "short"})
    assert short.status_code == 422 and "at least 12" in short.text
    done = await client.post("/password", {"old": one_time, "new": PASSWORD, "again": PASSWORD})
    assert done.status_code == 303
    assert (await client.get("/releases")).status_code == 200


async def test_an_idle_session_signs_out_at_30_minutes(
        app: Any, users: dict[str, str], clock: FakeClock) -> None:
    client = await signed_in(app, "viewer")
    clock.set(NOW + timedelta(minutes=30) - timedelta(microseconds=1))
    assert (await client.get("/releases")).status_code == 200  # and touches the session
    clock.set(clock.now() + timedelta(minutes=30))
    expired = await client.get("/releases")
    assert expired.status_code == 303 and expired.headers["location"].startswith("/sign-in")
    clock.set(clock.now() - timedelta(minutes=29))  # ended is ended, even back in time
    assert (await client.get("/releases")).status_code == 303


async def test_a_busy_session_still_ends_after_12_hours(
        app: Any, users: dict[str, str], clock: FakeClock) -> None:
    client = await signed_in(app, "viewer")
    for minutes in range(20, 12 * 60, 20):
        clock.set(NOW + timedelta(minutes=minutes))
        assert (await client.get("/releases")).status_code == 200
    clock.set(NOW + timedelta(hours=12))
    assert (await client.get("/releases")).status_code == 303


async def test_signing_out_ends_the_session_row(app: Any, users: dict[str, str]) -> None:
    client = await signed_in(app, "viewer")
    cookie = dict(client.http.cookies)
    assert (await client.post("/sign-out")).status_code == 303
    again = Client(app)
    again.http.cookies.update(cookie)
    assert (await again.get("/releases")).status_code == 303


# -- CSRF and Origin -------------------------------------------------------------------------
async def test_missing_or_wrong_csrf_is_refused(app: Any, users: dict[str, str],
                                                services: Services) -> None:
    client = await signed_in(app, "editor")
    data = {"title": "x", "publish_on": "2014-09-04", "officers": ""}
    for csrf in ("omit", "", "forged-token"):
        response = await client.post("/releases/new", data, csrf=csrf)
        assert response.status_code == 403
    other = await signed_in(app, "approver")  # a real token, of another session
    assert (await client.post("/releases/new", data, csrf=other.csrf)).status_code == 403
    with services.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Release)) == 0


async def test_a_foreign_origin_is_refused_and_same_origin_fetch_metadata_accepted(
        app: Any, users: dict[str, str]) -> None:
    client = await signed_in(app, "editor")
    data = {"csrf": client.csrf, "title": "t", "publish_on": "2014-09-04", "officers": "",
            "action": "check"}
    evil = await client.http.post("/releases/new", data=data,
                                  headers={"origin": "https://evil.example"})
    assert evil.status_code == 403
    client.http.headers.pop("origin")
    bare = await client.http.post("/releases/new", data=data)
    assert bare.status_code == 403
    # under Referrer-Policy: no-referrer a browser sends Origin: null and Sec-Fetch-Site
    browser = await client.http.post("/releases/new", data=data, headers={
        "origin": "null", "sec-fetch-site": "same-origin"})
    assert browser.status_code == 200
    cross = await client.http.post("/releases/new", data=data, headers={
        "origin": "null", "sec-fetch-site": "cross-site"})
    assert cross.status_code == 403


async def test_an_upload_without_the_right_csrf_seals_nothing(
        app: Any, users: dict[str, str], settings: Settings) -> None:
    client = await signed_in(app, "editor")
    release_id = await new_draft(client)
    for csrf in ("", "forged"):
        response = await upload(client, release_id, csrf=csrf)
        assert response.status_code == 403
    assert not list((settings.data_dir / "vault").rglob("*.emb"))


# -- roles ------------------------------------------------------------------------------------
PAGES = ["/releases", "/releases?state=queued", "/instant?publish_on=2014-09-04",
         "/releases/{id}", "/releases/{id}/review", "/releases/{id}/access", "/audit", "/nodes"]


@pytest.mark.parametrize("role", ROLES)
async def test_every_role_reads_every_release_page(app: Any, users: dict[str, str],
                                                   role: str) -> None:
    editor = await signed_in(app, "editor")
    release_id = await submitted(editor)
    client = await signed_in(app, role)
    for page in PAGES:
        response = await client.get(page.format(id=release_id))
        assert response.status_code == 200, (page, response.text)
    users_page = await client.get("/users")
    assert users_page.status_code == (200 if role == "admin" else 403)
    new_page = await client.get("/releases/new")
    assert new_page.status_code == (200 if role in ("editor", "approver") else 403)
    cancel = await client.get(f"/releases/{release_id}/cancel")
    assert cancel.status_code == (200 if role == "approver" else 403)
    resched = await client.get(f"/releases/{release_id}/reschedule")
    assert resched.status_code == (200 if role == "approver" else 403)


WRITES = ["/releases/new", "/releases/{id}/documents", "/releases/{id}/officers",
          "/releases/{id}/edit",
          "/releases/{id}/submit", "/releases/{id}/approve", "/releases/{id}/send-back",
          "/releases/{id}/review-forced", "/releases/{id}/cancel", "/releases/{id}/reschedule",
          "/releases/{id}/officers/rcp_x/remove"]


@pytest.mark.parametrize("role", ["viewer", "admin"])
async def test_a_viewers_and_an_admins_posts_are_refused(app: Any, users: dict[str, str],
                                                         services: Services, role: str) -> None:
    editor = await signed_in(app, "editor")
    release_id = await new_draft(editor)
    client = await signed_in(app, role)
    for path in WRITES:
        response = await client.post(path.format(id=release_id),
                                     {"reason": "r", "comment": "c", "title": "t",
                                      "publish_on": "2014-09-05"})
        assert response.status_code == 403, path
    assert ReleaseService(services, actor="t").get(release_id).state == "draft"


async def test_an_editor_cannot_approve_even_their_own_submission(
        app: Any, users: dict[str, str], services: Services) -> None:
    editor = await signed_in(app, "editor")
    release_id = await submitted(editor)
    await editor.get(f"/releases/{release_id}")
    for data in ({}, {"reason": "nobody else is here"}):
        assert (await editor.post(f"/releases/{release_id}/approve", data)).status_code == 403
    assert (await editor.post(f"/releases/{release_id}/send-back",
                              {"comment": "x"})).status_code == 403
    assert ReleaseService(services, actor="t").get(release_id).state == "awaiting_approval"


async def test_an_approver_needs_a_reason_to_approve_their_own_and_is_flagged(
        app: Any, users: dict[str, str], services: Services) -> None:
    approver = await signed_in(app, "approver")
    release_id = await submitted(approver)
    await approver.get(f"/releases/{release_id}")
    plain = await approver.post(f"/releases/{release_id}/approve")
    assert plain.status_code == 422 and "another approver must approve" in plain.text
    forced = await approver.post(f"/releases/{release_id}/approve",
                                 {"reason": "the others are on leave"})
    assert forced.status_code == 303
    page = await approver.get(f"/releases/{release_id}")
    assert "force-approved by its submitter" in page.text
    assert "release force approved" in page.text and "the others are on leave" in page.text
    other = make_user(services, "second", "approver")
    client = Client(create_app(load_settings(environ={}, overrides={
        "data_dir": str(services.keys_dir.parent), "web.base_url": BASE}), services=services))
    await client.sign_in("second", other)
    await client.get(f"/releases/{release_id}")
    assert (await client.post(f"/releases/{release_id}/review-forced")).status_code == 303
    assert ReleaseService(services, actor="t").get(release_id).forced_reason is None


async def test_the_signed_in_user_is_the_audit_actor(app: Any, users: dict[str, str],
                                                     services: Services) -> None:
    editor = await signed_in(app, "editor")
    release_id = await submitted(editor)
    approver = await signed_in(app, "approver")
    await approver.get(f"/releases/{release_id}")
    assert (await approver.post(f"/releases/{release_id}/approve")).status_code == 303
    events = ReleaseService(services, actor="t").get(release_id).events
    assert [(e.action, e.actor) for e in events] == [
        ("draft_created", "editor"), ("documents_sealed", "editor"),
        ("release_submitted", "editor"), ("release_approved", "approver")]
    release = ReleaseService(services, actor="t").get(release_id)
    assert release.state == "queued" and release.owner == "editor@press.example"


# -- building a release ---------------------------------------------------------------------
async def test_the_form_shows_the_instant_both_ways(app: Any, users: dict[str, str]) -> None:
    client = await signed_in(app, "editor")
    await client.get("/releases/new")
    response = await client.post("/releases/new", {"title": "t", "publish_on": "2014-09-04",
                                                   "at": "00:01", "action": "check",
                                                   "officers": ""})
    assert response.status_code == 200
    assert "00:01 BST Thursday 4 September 2014 (23:01 UTC Wednesday 3 September)" in \
        response.text
    page = await client.get("/releases/new")
    assert 'value="00:01"' in page.text and "one minute past midnight" in page.text


async def test_the_instant_endpoint_answers_both_ways_or_with_the_refusal(
        app: Any, users: dict[str, str]) -> None:
    client = await signed_in(app, "viewer")
    ok = (await client.get("/instant?publish_on=2014-09-04&at=00:01&zone=Europe/London")).json()
    assert ok == {"text": "00:01 BST Thursday 4 September 2014 "
                          "(23:01 UTC Wednesday 3 September)"}
    gap = (await client.get("/instant?publish_on=2015-03-29&at=01:30")).json()
    with pytest.raises(InputError) as refused:
        timerules.resolve("2015-03-29", at="01:30", zone="Europe/London", now=NOW)
    assert gap == {"error": str(refused.value)}
    assert (await Client(app).get("/instant?publish_on=2014-09-04")).status_code == 303


@pytest.mark.parametrize("at", ["01:30", "01:00"])
async def test_a_gap_or_fold_time_is_refused_exactly_as_the_command_line_does(
        app: Any, users: dict[str, str], at: str) -> None:
    day = "2015-03-29" if at == "01:30" else "2014-10-26"
    with pytest.raises(InputError) as refused:
        timerules.resolve(day, at=at, zone="Europe/London", now=NOW)
    client = await signed_in(app, "editor")
    await client.get("/releases/new")
    response = await client.post("/releases/new", {"title": "t", "publish_on": day, "at": at,
                                                   "action": "create", "officers": ""})
    assert response.status_code == 422
    assert html.escape(str(refused.value)) in response.text
    assert ("does not exist" if at == "01:30" else "happens twice") in response.text


async def test_a_title_with_script_is_escaped_everywhere(app: Any, users: dict[str, str]) -> None:
    client = await signed_in(app, "editor")
    title = '<script>alert("x")</script>'
    release_id = await new_draft(client, title=title)
    for page in ("/releases", f"/releases/{release_id}", f"/releases/{release_id}/review"):
        text = (await client.get(page)).text
        assert "<script>alert" not in text
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text


async def test_form_fields_go_through_the_text_validator(app: Any,
                                                         users: dict[str, str]) -> None:
    client = await signed_in(app, "editor")
    await client.get("/releases/new")
    for fields, problem in (({"title": "Report\u202e"}, "title contains"),
                            ({"title": "x" * 501}, "at most 500"),
                            ({"officers": "Ann\x00,ann@x.example,Force 1"},
                             "officers line 1: name contains")):
        data = {"title": "t", "publish_on": "2014-09-04", "officers": "",
                "action": "create", **fields}
        response = await client.post("/releases/new", data, files={"none": ("", b"")})
        assert response.status_code == 422 and problem in response.text, problem


async def test_uploads_are_sealed_and_checks_block_then_pass(
        app: Any, users: dict[str, str], services: Services, settings: Settings) -> None:
    client = await signed_in(app, "editor")
    release_id = await new_draft(client, officers=OFFICERS + "\nSpare,spare@x.example,Force 9")
    page = await client.get(f"/releases/{release_id}")
    assert "Error: no report" in page.text
    assert 'value="Force 1"' in page.text  # a letter slot for each officer's organisation
    assert (await upload(client, release_id)).status_code == 303
    review = await client.get(f"/releases/{release_id}/review")
    assert "Error:" not in review.text
    assert "Warning: officer Spare (Force 9) has no letter" in review.text
    release = ReleaseService(services, actor="t").get(release_id)
    assert [(d.kind, d.organisation, d.filename) for d in release.documents] == [
        ("report", None, "national-report.txt"), ("letter", "Force 1", "force-1.txt"),
        ("letter", "Force 2", "force-2.txt"), ("letter", "Force 3", "force-3.txt")]
    report = bundle_parts()[0][2]
    import hashlib

    assert release.documents[0].sha256 == hashlib.sha256(report).hexdigest()
    assert release.documents[0].size == len(report)
    for path in (settings.data_dir).rglob("*"):
        if path.is_file():
            assert MARKER.encode() not in path.read_bytes(), path
    # a second upload replaces the set (and its key), leaving no stray objects
    first = {p.name for p in (settings.data_dir / "vault").rglob("*.emb")}
    assert (await upload(client, release_id)).status_code == 303
    second = {p.name for p in (settings.data_dir / "vault").rglob("*.emb")}
    assert len(second) == 4 and not first & second


async def test_the_console_works_with_the_public_key_alone(
        settings: Settings, services: Services, users: dict[str, str]) -> None:
    (settings.keys_dir / "publisher.key").unlink()
    app = create_app(settings, services=services)
    client = await signed_in(app, "editor")
    release_id = await submitted(client)
    assert ReleaseService(services, actor="t").get(release_id).state == "awaiting_approval"


async def test_a_malformed_upload_is_refused_and_leaves_nothing(
        app: Any, users: dict[str, str], settings: Settings) -> None:
    client = await signed_in(app, "editor")
    release_id = await new_draft(client)
    body, content_type = multipart(client.csrf, bundle_parts())
    broken = body.replace(b"Content-Disposition: form-data; name=\"letter_2\"",
                          b"\x00\x01garbage", 1)
    response = await client.http.post(f"/releases/{release_id}/documents", content=broken,
                                      headers={"content-type": content_type})
    assert response.status_code == 422
    assert not list((settings.data_dir / "vault").rglob("*.emb"))


async def test_checks_refuse_a_letter_without_officer_and_a_duplicate_name(
        app: Any, users: dict[str, str], services: Services) -> None:
    client = await signed_in(app, "editor")
    release_id = await new_draft(client, officers="")
    await client.get(f"/releases/{release_id}")
    parts = bundle_parts()
    assert (await upload(client, release_id, parts)).status_code == 303
    review = await client.get(f"/releases/{release_id}/review")
    assert "Error: letter force-1.txt is for Force 1, which has no officer" in review.text
    refused = await client.post(f"/releases/{release_id}/submit")
    assert refused.status_code == 422
    assert ReleaseService(services, actor="t").get(release_id).state == "draft"
    duplicate = [*parts, ("letter_org_9", None, b"Force 9"),
                 ("letter_9", "force-1.txt", b"again")]
    response = await upload(client, release_id, duplicate)
    assert response.status_code == 422 and "two documents are named" in response.text
    with services.sessions() as session:  # the old set stays, the refused one is gone
        assert session.scalar(select(func.count()).select_from(Document)) == 4


async def test_min_lead_refuses_a_release_due_too_soon(
        app: Any, users: dict[str, str], services: Services, clock: FakeClock) -> None:
    client = await signed_in(app, "editor")
    release_id = await ready_draft(client)
    instant = ReleaseService(services, actor="t").get(release_id).instant
    clock.set(instant - timedelta(minutes=15) + timedelta(microseconds=1))
    client = await signed_in(app, "editor")  # two days on: the old session is long gone
    await client.get(f"/releases/{release_id}/review")
    refused = await client.post(f"/releases/{release_id}/submit")
    assert refused.status_code == 422 and "less than 00:15:00 away" in refused.text
    clock.set(instant - timedelta(minutes=15))
    assert (await client.post(f"/releases/{release_id}/submit")).status_code == 303


async def test_a_sent_back_draft_is_edited_and_submitted_again(
        app: Any, users: dict[str, str], services: Services) -> None:
    editor = await signed_in(app, "editor")
    release_id = await submitted(editor)
    approver = await signed_in(app, "approver")
    await approver.get(f"/releases/{release_id}")
    back = await approver.post(f"/releases/{release_id}/send-back",
                               {"comment": "it is due a week later"})
    assert back.status_code == 303
    page = await editor.get(f"/releases/{release_id}")
    assert "it is due a week later" in page.text and "Change the title or the time" in page.text
    gap = await editor.post(f"/releases/{release_id}/edit", {
        "title": "Core business", "publish_on": "2015-03-29", "at": "01:30", "zone": ""})
    assert gap.status_code == 422 and "does not exist" in gap.text
    moved = await editor.post(f"/releases/{release_id}/edit", {
        "title": "Core business, revised", "publish_on": "2014-09-11", "at": "", "zone": "",
        "copies_at": "2014-09-10 09:00"})
    assert moved.status_code == 303
    release = ReleaseService(services, actor="t").get(release_id)
    assert (release.title, release.wall) == ("Core business, revised", "2014-09-11T00:01")
    assert release.copies_at is not None
    assert release.copies_at.utc == datetime(2014, 9, 10, 8, 0, tzinfo=UTC)
    assert len(release.documents) == 4  # the sealed documents stay
    await editor.get(f"/releases/{release_id}/review")
    assert (await editor.post(f"/releases/{release_id}/submit")).status_code == 303
    assert ReleaseService(services, actor="t").get(release_id).state == "awaiting_approval"


async def test_officers_one_by_one_and_removed(app: Any, users: dict[str, str],
                                               services: Services) -> None:
    client = await signed_in(app, "editor")
    release_id = await new_draft(client, officers="")
    await client.get(f"/releases/{release_id}")
    added = await client.post(f"/releases/{release_id}/officers", {
        "name": "Ann O'Neill, DI", "email": "ann@force1.police.example",
        "organisation": "Force 1"})
    assert added.status_code == 303
    bad = await client.post(f"/releases/{release_id}/officers", {
        "name": "Bob", "email": "not-an-email", "organisation": "Force 2"})
    assert bad.status_code == 422 and "not a valid email" in bad.text
    release = ReleaseService(services, actor="t").get(release_id)
    assert [r.name for r in release.recipients] == ["Ann O'Neill, DI"]
    gone = await client.post(f"/releases/{release_id}/officers/{release.recipients[0].id}"
                             "/remove")
    assert gone.status_code == 303
    assert ReleaseService(services, actor="t").get(release_id).recipients == ()


async def test_an_interrupted_upload_leaves_nothing(app: Any, users: dict[str, str],
                                                    settings: Settings,
                                                    services: Services) -> None:
    client = await signed_in(app, "editor")
    release_id = await new_draft(client)
    body, content_type = multipart(client.csrf, bundle_parts())
    cut = body[: len(body) // 2]

    async def chunks() -> AsyncIterator[bytes]:
        yield cut
        raise httpx.ReadError("connection dropped")  # the client goes away mid-file

    with pytest.raises(Exception):  # noqa: B017 - whatever the transport makes of it
        await client.http.post(f"/releases/{release_id}/documents", content=chunks(),
                               headers={"content-type": content_type})
    truncated = await client.http.post(f"/releases/{release_id}/documents", content=cut,
                                       headers={"content-type": content_type})
    assert truncated.status_code == 422
    assert not list((settings.data_dir / "vault").rglob("*.emb"))
    assert not any((settings.data_dir / "vault").rglob(".part-*"))
    assert ReleaseService(services, actor="t").get(release_id).documents == ()


# -- error mapping, cancel and reschedule --------------------------------------------------------
async def test_errors_map_to_404_409_422(app: Any, users: dict[str, str]) -> None:
    editor = await signed_in(app, "editor")
    release_id = await new_draft(editor)
    approver = await signed_in(app, "approver")
    assert (await approver.get("/releases/rel_0000000000000000")).status_code == 404
    await approver.get(f"/releases/{release_id}")
    wrong_state = await approver.post(f"/releases/{release_id}/approve")
    assert wrong_state.status_code == 409 and "awaiting approval" in wrong_state.text
    assert (await approver.get("/releases?state=bogus")).status_code == 422


async def test_cancel_and_reschedule_need_a_confirmed_reason(
        app: Any, users: dict[str, str], services: Services) -> None:
    editor = await signed_in(app, "editor")
    release_id = await submitted(editor)
    approver = await signed_in(app, "approver")
    await approver.get(f"/releases/{release_id}/reschedule")
    no_reason = await approver.post(f"/releases/{release_id}/reschedule",
                                    {"publish_on": "2014-09-11", "at": "00:01", "reason": ""})
    assert no_reason.status_code == 422 and "give the reason" in no_reason.text
    moved = await approver.post(f"/releases/{release_id}/reschedule",
                                {"publish_on": "2014-09-11", "at": "", "reason": "minister"})
    assert moved.status_code == 303
    release = ReleaseService(services, actor="t").get(release_id)
    assert release.wall == "2014-09-11T00:01"  # the wall time of day is kept
    await approver.get(f"/releases/{release_id}/cancel")
    assert (await approver.post(f"/releases/{release_id}/cancel",
                                {"reason": ""})).status_code == 422
    assert (await approver.post(f"/releases/{release_id}/cancel",
                                {"reason": "withdrawn"})).status_code == 303
    release = ReleaseService(services, actor="t").get(release_id)
    assert release.state == "cancelled" and release.reason == "withdrawn"
    details = [e.details for e in ReleaseService(services, actor="t").get(release_id).events
               if e.action == "release_rescheduled"]
    assert details[0]["reason"] == "minister"


async def test_a_queued_release_page_asks_the_script_to_watch_it(
        app: Any, users: dict[str, str]) -> None:
    editor = await signed_in(app, "editor")
    release_id = await submitted(editor)
    assert 'id="watch"' not in (await editor.get(f"/releases/{release_id}")).text
    approver = await signed_in(app, "approver")
    await approver.get(f"/releases/{release_id}")
    await approver.post(f"/releases/{release_id}/approve")
    page = (await approver.get(f"/releases/{release_id}")).text
    assert '<span hidden id="watch" data-instant="2014-09-03T23:01:00Z">' in page


async def test_an_editor_discards_only_their_own_draft(app: Any, users: dict[str, str],
                                                       services: Services) -> None:
    approver = await signed_in(app, "approver")
    theirs = await new_draft(approver)
    editor = await signed_in(app, "editor")
    mine = await new_draft(editor)
    assert (await editor.get(f"/releases/{theirs}/cancel")).status_code == 403
    await editor.get(f"/releases/{mine}/cancel")
    assert (await editor.post(f"/releases/{theirs}/cancel",
                              {"reason": "tidy"})).status_code == 403
    assert (await editor.post(f"/releases/{mine}/cancel", {"reason": "tidy"})).status_code == 303
    assert ReleaseService(services, actor="t").get(mine).state == "cancelled"
    assert ReleaseService(services, actor="t").get(theirs).state == "draft"


async def test_an_unstampable_pdf_upload_is_refused_as_the_command_line_refuses_it(
        app: Any, users: dict[str, str], settings: Settings, services: Services) -> None:
    """A PDF that cannot be stamped is refused at upload, not found out when the
    pre-embargo copies go; a good PDF beside it is accepted."""
    from release.pdf_text import text_pdf

    client = await signed_in(app, "editor")
    release_id = await new_draft(client)
    parts = bundle_parts()
    parts[0] = ("report", "national-report.pdf", text_pdf([["National report, page 1"]]))
    good = [(n, f.replace(".txt", ".pdf") if f else f,
             text_pdf([[c.decode()]]) if f else c) for n, f, c in parts[1:]]
    bad = list(good)
    bad[3] = ("letter_2", "force-2.pdf", b"this is a text file\n")
    response = await upload(client, release_id, [parts[0], *bad])
    assert response.status_code == 422
    assert "force-2.pdf cannot be stamped" in response.text
    assert not list((settings.data_dir / "vault").rglob("*.emb"))
    assert (await upload(client, release_id, [parts[0], *good])).status_code == 303
    release = ReleaseService(services, actor="t").get(release_id)
    assert [d.filename for d in release.documents] == [
        "national-report.pdf", "force-1.pdf", "force-2.pdf", "force-3.pdf"]
