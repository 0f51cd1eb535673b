"""The console: Starlette routes, each one thin over the release service.

Every route checks the signed-in user's role on the server; every POST
checks the Origin and the session's CSRF token. Errors map once: not found
404, bad input 422 (shown on the form), wrong state 409."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import anyio
from jinja2 import Environment, PackageLoader, select_autoescape
from python_multipart.exceptions import ParseError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from config.errors import HTTP_STATUS, EmbargoError, InputError, status_for
from config.settings import Settings
from release import accounts, approval, drafts, timerules
from release.accounts import Role, SignedIn
from release.clock import Clock
from release.context import Services
from release.instants import describe_instant, embargo_of
from release.records import DRAFT, ReleaseState
from release.service import ReleaseService
from release.views import ReleaseDetail, ReleaseSummary
from storage import migrate
from storage.db import make_engine, new_sqlite_file
from storage.factory import make_public, make_s3_client, make_vault, needs_s3
from web.security import SecurityHeaders, is_plain_localhost, origin_of, same_origin
from web.upload import DocumentUpload, UploadRefused

log = logging.getLogger(__name__)

STATES = tuple(ReleaseState)
EDITORS = (Role.EDITOR, Role.APPROVER)
APPROVERS = (Role.APPROVER,)
ANYONE = tuple(Role)
MAX_OFFICERS_CSV = 1 << 20
TITLES = {404: "Not found", 422: "That cannot be done", 409: "Not in this state"}


def build_services(settings: Settings, *, clock: Clock | None = None) -> Services:
    """The console's services: the same stores as the scheduler's, the
    public key only (the private key is never loaded here). Like every
    command but ``db upgrade``, ``run`` and ``demo``, the console migrates
    nothing: a database not at the latest schema raises SchemaError (a new
    SQLite file is created with its schema)."""
    created = new_sqlite_file(settings.database_url)
    engine = make_engine(settings.database_url)
    if created:
        migrate.upgrade(engine)
    else:
        migrate.require_current(engine)
    s3_client = make_s3_client(settings) if needs_s3(settings) else None
    return Services(
        engine=engine,
        vault=make_vault(settings.vault, s3_client=s3_client),
        public=make_public(settings.public, settings, s3_client=s3_client),
        keys_dir=settings.keys_dir, clock=clock or Clock(), zone=settings.zone,
        default_at=settings.default_at, copies_max_lead=settings.copies.max_lead,
        copies_cutoff=settings.copies.cutoff,
        copies_unstampable=settings.copies.unstampable, alerts_to=settings.alerts.to,
        alerts_repeat=settings.alerts.repeat,
        approval_required=settings.approval.required)


class SignInNeeded(Exception):
    """No live session: go to the sign-in page."""


class Forbidden(Exception):
    """Signed in, but this role may not do this, or the form did not prove itself."""


class Console:
    """The console's state: settings, services, templates."""

    def __init__(self, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.s = services
        self.idle: timedelta = settings.web.session_idle
        self.absolute: timedelta = settings.web.session_max
        self.min_lead: timedelta = settings.web.min_lead
        base = settings.web.base_url or f"http://{settings.web.bind}"
        self.origin = origin_of(base)
        self.secure = not is_plain_localhost(base)
        self.cookie = "__Host-embargo" if self.secure else "embargo_session"
        env = Environment(loader=PackageLoader("web", "templates"),
                          autoescape=select_autoescape(default=True, default_for_string=True))
        env.filters["both"] = lambda when, zone: describe_instant(when, zone) if when else ""
        env.globals["tz"] = ZoneInfo
        self.templates = Jinja2Templates(env=env)

    # -- who is asking ------------------------------------------------------------
    def signed_in(self, request: Request) -> SignedIn | None:
        return accounts.current(self.s, request.cookies.get(self.cookie, ""),
                                now=self.s.clock.now(), idle=self.idle, absolute=self.absolute)

    def need(self, request: Request, roles: tuple[Role, ...] = ANYONE, *,
             password_ok: bool = False) -> SignedIn:
        who = self.signed_in(request)
        if who is None:
            raise SignInNeeded()
        if who.account.must_change and not password_ok:
            raise HTTPException(303, headers={"location": "/password"})
        if who.account.role not in roles:
            raise Forbidden(f"your role ({who.account.role}) may not do this")
        return who

    def prove(self, request: Request, who: SignedIn | None, form: Any) -> None:
        """A POST must come from our own pages and carry the session's CSRF token."""
        if not same_origin({k.lower(): v for k, v in request.headers.items()}, self.origin):
            raise Forbidden("this form did not come from the console's own pages")
        if who is not None and not accounts.csrf_matches(who, form.get("csrf")):
            raise Forbidden("this form has expired or was not sent from the console; "
                            "reload the page and try again")

    async def posted(self, request: Request, roles: tuple[Role, ...] = ANYONE, *,
                     password_ok: bool = False) -> tuple[SignedIn, Any]:
        who = self.need(request, roles, password_ok=password_ok)
        form = await request.form(max_files=0, max_fields=200)
        self.prove(request, who, form)
        return who, form

    # -- rendering ------------------------------------------------------------------
    def page(self, request: Request, template: str, who: SignedIn | None, status: int = 200,
             **context: Any) -> Response:
        return self.templates.TemplateResponse(request, template, {
            "who": who, "csrf": who.csrf if who else "", "now": self.s.clock.now(),
            "approval_required": self.s.approval_required, "zone": self.s.zone, **context},
            status_code=status)

    def service(self, who: SignedIn) -> ReleaseService:
        return ReleaseService(self.s, actor=who.account.name)


def _see(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def _local(path: str | None) -> str:
    """A path on this console to go on to after signing in; anything else
    (another host, a scheme-relative URL) is the releases list."""
    if path and path.startswith("/") and not path.startswith(("//", "/\\")):
        return path
    return "/releases"


def _facts(release: ReleaseSummary, now: datetime) -> dict[str, Any]:
    embargo = embargo_of(release)
    return {"release": release, "embargo": embargo.describe_long(),
            "instant": release.instant.isoformat().replace("+00:00", "Z"),
            "left": timerules.format_delta(release.instant - now)
            if release.instant > now else None}


def routes(c: Console) -> list[Route | Mount]:
    # -- sign in and out -----------------------------------------------------------------
    async def sign_in_page(request: Request) -> Response:
        if c.signed_in(request) is not None:
            return _see("/releases")
        return c.page(request, "sign_in.html", None, next=_local(request.query_params.get("next")))

    async def sign_in(request: Request) -> Response:
        form = await request.form(max_files=0)
        c.prove(request, None, form)
        try:
            who = await anyio.to_thread.run_sync(lambda: accounts.sign_in(
                c.s, str(form.get("name", "")), str(form.get("password", "")),
                now=c.s.clock.now()))
        except accounts.SignInRefused as exc:
            return c.page(request, "sign_in.html", None, 401, error=str(exc),
                          name=str(form.get("name", "")), next=_local(str(form.get("next"))))
        response = _see("/password" if who.account.must_change
                        else _local(str(form.get("next", ""))))
        response.set_cookie(c.cookie, who.session_id, httponly=True, samesite="strict",
                            secure=c.secure, path="/", max_age=int(c.absolute.total_seconds()))
        return response

    async def sign_out(request: Request) -> Response:
        who, _ = await c.posted(request, password_ok=True)
        accounts.sign_out(c.s, who.session_id, now=c.s.clock.now())
        response = _see("/sign-in")
        response.delete_cookie(c.cookie, path="/", secure=c.secure, httponly=True,
                               samesite="strict")
        return response

    async def password_page(request: Request) -> Response:
        return c.page(request, "password.html", c.need(request, password_ok=True))

    async def password(request: Request) -> Response:
        who, form = await c.posted(request, password_ok=True)
        new = str(form.get("new", ""))
        if new != form.get("again"):
            return c.page(request, "password.html", who, 422,
                          error="the two new passwords differ")
        try:
            await anyio.to_thread.run_sync(lambda: accounts.change_password(
                c.s, who, old=str(form.get("old", "")), new=new, now=c.s.clock.now()))
        except InputError as exc:
            return c.page(request, "password.html", who, 422, error=str(exc))
        return _see("/releases")

    # -- releases ---------------------------------------------------------------------------
    async def home(request: Request) -> Response:
        c.need(request)
        return _see("/releases")

    async def releases(request: Request) -> Response:
        who = c.need(request)
        state = request.query_params.get("state", "")
        if state and state not in STATES:
            raise InputError(f"{state!r} is not a state: {', '.join(STATES)}")
        now = c.s.clock.now()
        rows = [_facts(r, now) for r in c.service(who).list_releases()
                if not state or r.state == state]
        return c.page(request, "releases.html", who, rows=rows, state=state, states=STATES)

    def new_form(request: Request, who: SignedIn, values: dict[str, str] | None = None, *,
                 status: int = 200, shown: str | None = None,
                 error: str | None = None) -> Response:
        defaults = {"title": "", "publish_on": "", "at": c.s.default_at, "zone": c.s.zone,
                    "copies_at": "", "officers": ""}
        return c.page(request, "new.html", who, status, form={**defaults, **(values or {})},
                      shown=shown, error=error)

    async def new_page(request: Request) -> Response:
        return new_form(request, c.need(request, EDITORS))

    async def new(request: Request) -> Response:
        who = c.need(request, EDITORS)
        form = await request.form(max_files=1, max_part_size=MAX_OFFICERS_CSV)
        c.prove(request, who, form)
        values = {k: str(form.get(k, "")).strip() for k in
                  ("title", "publish_on", "at", "zone", "copies_at", "officers")}
        try:
            text = values["officers"]
            upload = form.get("officers_csv")
            if upload is not None and not isinstance(upload, str):
                data = await upload.read(MAX_OFFICERS_CSV + 1)
                if len(data) > MAX_OFFICERS_CSV:
                    raise InputError("the officers' CSV is larger than 1 MiB")
                try:
                    text = text + "\n" + data.decode("utf-8-sig")
                except UnicodeDecodeError:
                    raise InputError("the officers' CSV is not UTF-8 text") from None
            officers = drafts.parse_officers(text)
            if not values["publish_on"]:
                raise InputError("give the publication day")
            embargo = c.service(who).resolve_embargo(values["publish_on"], values["at"] or None,
                                                     values["zone"] or None, c.s.clock.now())
            if form.get("action") == "check":
                return new_form(request, who, values, shown=embargo.describe_long())
            release = drafts.create_draft(
                c.s, actor=who.account.name, title=values["title"],
                publish_on=values["publish_on"], at=values["at"] or None,
                zone=values["zone"] or None, owner=who.account.email,
                copies_at=values["copies_at"] or None, officers=officers)
        except InputError as exc:
            return new_form(request, who, values, status=422, error=str(exc))
        return _see(f"/releases/{release.id}")

    def release_page(request: Request, who: SignedIn, status: int = 200,
                     error: str | None = None) -> Response:
        service = c.service(who)
        release = service.get(request.path_params["id"])
        now = c.s.clock.now()
        return c.page(request, "release.html", who, status, **_facts(release, now),
                      notices=release.notices, access=release.access_list,
                      events=release.events,
                      checks=drafts.check(release, now=now, min_lead=c.min_lead)
                      if release.state == DRAFT else None,
                      organisations=sorted({r.organisation or "" for r in release.recipients}),
                      error=error)

    async def instant(request: Request) -> Response:
        """The instant a day, time and zone name, both ways (for the form's
        live display; the form shows the same after a submit)."""
        who = c.need(request)
        q = request.query_params
        try:
            embargo = c.service(who).resolve_embargo(
                q.get("publish_on", ""), q.get("at") or None, q.get("zone") or None,
                c.s.clock.now())
        except InputError as exc:
            return JSONResponse({"error": str(exc)})
        return JSONResponse({"text": embargo.describe_long()})

    async def one(request: Request) -> Response:
        return release_page(request, c.need(request))

    async def documents(request: Request) -> Response:
        who = c.need(request, EDITORS)
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not same_origin(headers, c.origin):
            raise Forbidden("this form did not come from the console's own pages")
        release_id = request.path_params["id"]
        document_set = await anyio.to_thread.run_sync(
            lambda: drafts.DocumentSet(c.s, release_id, actor=who.account.name))
        upload = DocumentUpload(headers.get("content-type", ""), document_set,
                                lambda token: accounts.csrf_matches(who, token))
        try:
            async for chunk in request.stream():
                if chunk:
                    await anyio.to_thread.run_sync(upload.write, chunk)
            await anyio.to_thread.run_sync(upload.finish)
            await anyio.to_thread.run_sync(document_set.commit)
        except UploadRefused:
            await anyio.to_thread.run_sync(upload.abort)
            raise Forbidden("this form has expired or was not sent from the console; "
                            "reload the page and try again") from None
        except (InputError, ParseError) as exc:
            await anyio.to_thread.run_sync(upload.abort)
            if isinstance(exc, ParseError):
                exc = InputError(f"the upload could not be read: {exc}")
            return await _one_with_error(request, exc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(upload.abort)
            raise
        return _see(f"/releases/{document_set.release.id}")

    async def _one_with_error(request: Request, exc: EmbargoError) -> Response:
        """The release page again, with the refusal on it (422)."""
        return release_page(request, c.need(request), 422, error=str(exc))

    async def edit(request: Request) -> Response:
        who, form = await c.posted(request, EDITORS)
        release_id = request.path_params["id"]
        values = {k: str(form.get(k, "")).strip() for k in
                  ("title", "publish_on", "at", "zone", "copies_at")}
        try:
            drafts.edit_draft(c.s, release_id, actor=who.account.name, title=values["title"],
                              publish_on=values["publish_on"], at=values["at"] or None,
                              zone=values["zone"] or None,
                              copies_at=values["copies_at"] or None)
        except InputError as exc:
            return await _one_with_error(request, exc)
        return _see(f"/releases/{release_id}")

    async def officers(request: Request) -> Response:
        who, form = await c.posted(request, EDITORS)
        release_id = request.path_params["id"]
        try:
            if form.get("csv"):
                found = drafts.parse_officers(str(form["csv"]))
            else:
                found = drafts.parse_officers(",".join(
                    '"' + str(form.get(k, "")).replace('"', '""') + '"'
                    for k in ("name", "email", "organisation")))
            if not found:
                raise InputError("give an officer's name, email and organisation")
            drafts.add_officers(c.s, release_id, found, actor=who.account.name)
        except InputError as exc:
            return await _one_with_error(request, exc)
        return _see(f"/releases/{release_id}")

    async def remove_officer(request: Request) -> Response:
        who, _ = await c.posted(request, EDITORS)
        release_id = request.path_params["id"]
        drafts.remove_officer(c.s, release_id, request.path_params["rid"],
                              actor=who.account.name)
        return _see(f"/releases/{release_id}")

    async def review(request: Request) -> Response:
        who = c.need(request)
        release = c.service(who).get(request.path_params["id"])
        now = c.s.clock.now()
        checks = drafts.check(release, now=now, min_lead=c.min_lead)
        return c.page(request, "review.html", who, **_facts(release, now), checks=checks)

    async def submit(request: Request) -> Response:
        who, _ = await c.posted(request, EDITORS)
        release_id = request.path_params["id"]
        try:
            drafts.submit(c.s, release_id, actor=who.account.name, min_lead=c.min_lead)
        except InputError as exc:
            release = c.service(who).get(release_id)
            now = c.s.clock.now()
            return c.page(request, "review.html", who, 422, **_facts(release, now),
                          checks=drafts.check(release, now=now, min_lead=c.min_lead),
                          error=str(exc))
        return _see(f"/releases/{release_id}")

    def action(roles: tuple[Role, ...],
               do: Callable[[SignedIn, str, Any], object]) -> Callable[[Request],
                                                                       Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            who, form = await c.posted(request, roles)
            release_id = request.path_params["id"]
            try:
                do(who, release_id, form)
            except InputError as exc:
                return await _one_with_error(request, exc)
            return _see(f"/releases/{release_id}")

        return handler

    approve = action(APPROVERS, lambda who, rid, form: approval.approve(
        c.s, rid, actor=who.account.name, force_reason=str(form.get("reason", "")) or None))
    send_back = action(APPROVERS, lambda who, rid, form: approval.send_back(
        c.s, rid, actor=who.account.name, comment=str(form.get("comment", ""))))
    review_forced = action(APPROVERS, lambda who, rid, form: approval.review_forced(
        c.s, rid, actor=who.account.name))

    def may_cancel(who: SignedIn, release: ReleaseDetail) -> None:
        if who.account.role == Role.APPROVER:
            return
        if release.state != DRAFT or release.created_by != who.account.name:
            raise Forbidden("an editor may discard only their own drafts; an approver "
                            "cancels releases")

    async def confirm_page(request: Request) -> Response:
        what = request.url.path.rsplit("/", 1)[1]
        who = c.need(request, EDITORS if what == "cancel" else APPROVERS)
        release = c.service(who).get(request.path_params["id"])
        if what == "cancel":
            may_cancel(who, release)
        return c.page(request, "confirm.html", who, what=what,
                      **_facts(release, c.s.clock.now()),
                      form={"reason": "", "publish_on": "", "at": release.wall[11:16],
                            "zone": release.zone})

    async def confirm(request: Request) -> Response:
        what = request.url.path.rsplit("/", 1)[1]
        who, form = await c.posted(request, EDITORS if what == "cancel" else APPROVERS)
        service = c.service(who)
        release = service.get(request.path_params["id"])
        values = {k: str(form.get(k, "")).strip() for k in ("reason", "publish_on", "at", "zone")}
        try:
            if not values["reason"]:
                raise InputError(f"give the reason for the {what}; it goes in the audit trail")
            if what == "cancel":
                may_cancel(who, release)
                service.cancel(release.id, reason=values["reason"])
            else:
                if not values["publish_on"]:
                    raise InputError("give the new publication day")
                service.reschedule(release.id, publish_on=values["publish_on"],
                                   at=values["at"] or None, zone=values["zone"] or None,
                                   reason=values["reason"])
        except InputError as exc:
            return c.page(request, "confirm.html", who, 422, what=what, error=str(exc),
                          **_facts(release, c.s.clock.now()), form=values)
        return _see(f"/releases/{release.id}")

    async def access(request: Request) -> Response:
        who = c.need(request)
        release, rows = c.service(who).access_list(request.path_params["id"])
        return c.page(request, "access.html", who, **_facts(release, c.s.clock.now()),
                      rows=rows)

    async def audit_page(request: Request) -> Response:
        who = c.need(request)
        report = c.service(who).verify_audit()
        return c.page(request, "audit.html", who, report=report)

    async def nodes(request: Request) -> Response:
        who = c.need(request)
        return c.page(request, "nodes.html", who, rows=c.service(who).nodes())

    async def users(request: Request) -> Response:
        who = c.need(request, (Role.ADMIN,))
        return c.page(request, "users.html", who, users=accounts.list_users(c.s))

    static = Path(__file__).with_name("static")
    return [
        Route("/", home),
        Route("/sign-in", sign_in_page, methods=["GET"]),
        Route("/sign-in", sign_in, methods=["POST"]),
        Route("/sign-out", sign_out, methods=["POST"]),
        Route("/password", password_page, methods=["GET"]),
        Route("/password", password, methods=["POST"]),
        Route("/releases", releases, methods=["GET"]),
        Route("/releases/new", new_page, methods=["GET"]),
        Route("/releases/new", new, methods=["POST"]),
        Route("/instant", instant, methods=["GET"]),
        Route("/releases/{id}", one, methods=["GET"]),
        Route("/releases/{id}/documents", documents, methods=["POST"]),
        Route("/releases/{id}/edit", edit, methods=["POST"]),
        Route("/releases/{id}/officers", officers, methods=["POST"]),
        Route("/releases/{id}/officers/{rid}/remove", remove_officer, methods=["POST"]),
        Route("/releases/{id}/review", review, methods=["GET"]),
        Route("/releases/{id}/submit", submit, methods=["POST"]),
        Route("/releases/{id}/approve", approve, methods=["POST"]),
        Route("/releases/{id}/send-back", send_back, methods=["POST"]),
        Route("/releases/{id}/review-forced", review_forced, methods=["POST"]),
        Route("/releases/{id}/cancel", confirm_page, methods=["GET"]),
        Route("/releases/{id}/cancel", confirm, methods=["POST"]),
        Route("/releases/{id}/reschedule", confirm_page, methods=["GET"]),
        Route("/releases/{id}/reschedule", confirm, methods=["POST"]),
        Route("/releases/{id}/access", access, methods=["GET"]),
        Route("/audit", audit_page, methods=["GET"]),
        Route("/nodes", nodes, methods=["GET"]),
        Route("/users", users, methods=["GET"]),
        Mount("/static", StaticFiles(directory=static), name="static"),
    ]


def create_app(settings: Settings, *, services: Services | None = None) -> Starlette:
    """The console as an ASGI app."""
    console = Console(settings, services or build_services(settings))

    def refused(status: int, title: str) -> Callable[[Request, Exception],
                                                     Awaitable[Response]]:
        async def handler(request: Request, exc: Exception) -> Response:
            return console.page(request, "error.html", console.signed_in(request), status,
                                title=title, message=str(exc))

        return handler

    async def error_page(request: Request, exc: Exception) -> Response:
        """A domain error, at the status issue 10's one mapping gives it
        (config.errors.HTTP_STATUS: not found 404, bad input 422, wrong state 409)."""
        assert isinstance(exc, EmbargoError)
        status = status_for(exc, HTTP_STATUS)
        if status >= 500:
            log.error("%s on %s %s", type(exc).__name__, request.method, request.url.path,
                      exc_info=exc)
        return console.page(request, "error.html", console.signed_in(request), status,
                            title=TITLES.get(status, "Something went wrong"), message=str(exc))

    async def sign_in_needed(request: Request, exc: Exception) -> Response:
        if request.method == "GET":
            return _see(f"/sign-in?next={quote(request.url.path)}")
        return console.page(request, "sign_in.html", None, 401,
                            error="Your session has ended; sign in again.")

    app = Starlette(
        routes=routes(console),
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={
            SignInNeeded: sign_in_needed,
            Forbidden: refused(403, "Not allowed"),
            EmbargoError: error_page,
        },
    )
    app.state.console = console
    return app
