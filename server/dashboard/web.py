"""The operator's dashboard over HTTP (aiohttp): pages, sign-in, role and CSRF checks, on an event loop of its own."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import grpc
import jinja2
from aiohttp import web

from chronorec.server.config import Limits
from chronorec.server.core.canary import CanaryPolicy, check_percent
from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.errors import ChronorecError, InvalidArgument, Overloaded, Unavailable
from chronorec.server.dashboard import reports, views
from chronorec.server.dashboard.charts import bar_chart
from chronorec.server.dashboard.sessions import COOKIE_NAME, Session, SessionStore
from chronorec.server.security import (
    Principal,
    Role,
    TokenTable,
    bearer_token,
    check_dashboard_bind_policy,
    required_role,
)
from chronorec.server.service.errors import status_for
from chronorec.server.service.executors import Executors

log = logging.getLogger("chronorec.dashboard")
# Actions (activate, rollback, canary), one line each naming the caller: the same log as erasures.
audit = logging.getLogger("chronorec.audit")

HERE = Path(__file__).resolve().parent
# Who is asking, set by the guard for the handlers: the session (None with a bearer header) and principal.
SESSION = web.RequestKey("session", object)
PRINCIPAL = web.RequestKey("principal", object)
# Pages worked on at once; more wait. Each holds at most one thread of the server's pools, so the
# dashboard can never take more than this many of the threads gRPC calls run on.
MAX_PAGES_AT_ONCE = 2
PAGE_WAIT_S = 10.0
# A form is a few fields; the inline history is the largest (max_history_events lines).
MAX_BODY_BYTES = 256 * 1024
# Seconds between the Status page's refreshes.
STATUS_REFRESH_S = 5
# The one place HTTP statuses are chosen for domain errors: through their gRPC status.
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ACTIONS = {
    "activate": "Activate a version",
    "rollback": "Roll back to the previous version",
    "canary-start": "Start a canary",
    "canary-promote": "Promote the canary",
    "canary-abort": "Abort the canary",
}
# Each page and action is allowed to whoever may make the gRPC call that does the same, by the
# one table of roles (security.REQUIRED_ROLE): a role change there changes the dashboard too.
_MODELS = "/chronorec.v1.ModelService/"
SAME_AS_RPC = {
    "status": _MODELS + "GetStatus",
    "preview": "/chronorec.v1.RecommenderService/Recommend",
    "item": "/chronorec.v1.RecommenderService/SimilarItems",
    "evaluation": _MODELS + "ListVersions",
    "actions": _MODELS + "ListVersions",
    "activate": _MODELS + "ActivateVersion",
    "rollback": _MODELS + "Rollback",
    "canary-start": _MODELS + "ActivateVersion",
    "canary-promote": _MODELS + "PromoteCanary",
    "canary-abort": _MODELS + "AbortCanary",
}
# Content the pages may load: their own scripts, styles and images only, never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class DashboardSettings:
    """Where the dashboard listens and what it reads; TLS files are the gRPC server's."""

    host: str = "127.0.0.1"
    port: int = 0
    reports: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    limits: Limits = Limits()

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def ssl_context(settings: DashboardSettings) -> ssl.SSLContext | None:
    """The server's certificate (and client CA: mutual TLS) for HTTPS, when TLS is on."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_client_ca is not None:
        context.load_verify_locations(str(settings.tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _utc(seconds: float | None, with_time: bool = True) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    return time.strftime("%Y-%m-%d %H:%M UTC" if with_time else "%Y-%m-%d", time.gmtime(seconds))


def _num(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        # Every value is escaped unless a view marks it safe (charts, the report's HTML).
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = _utc
    env.filters["date"] = lambda s: _utc(s, with_time=False)
    env.filters["num"] = _num
    env.filters["urlpart"] = lambda s: quote(str(s), safe="")
    env.filters["mb"] = lambda b: f"{b / 1e6:,.1f} MB"
    return env


def _same_origin(request: web.Request) -> bool:
    """The request comes from a page of this dashboard (Origin, else Referer, names this host)."""
    expected = f"{request.scheme}://{request.host}"
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == expected
    referer = request.headers.get("Referer")
    if referer:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == expected
    return False


def _safe_next(target: str | None) -> str:
    """A path on this dashboard to go to after sign-in (never another site: //host, scheme:...)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class Dashboard:
    """The dashboard's pages over one engine, with the gRPC servicers' pools for blocking work."""

    def __init__(self, engine: ChronorecEngine, executors: Executors, sessions: SessionStore, settings: DashboardSettings):
        self.engine = engine
        self.work = executors
        self.sessions = sessions
        self.settings = settings
        self.templates = _environment()
        self._pages: asyncio.Semaphore | None = None

    # ---------------------------------------------------------------- application

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/", self.status_page)
        app.router.add_get("/preview", self.preview_page)
        app.router.add_get("/items/{item_id}", self.item_page)
        app.router.add_get("/evaluation", self.evaluation_page)
        app.router.add_get("/evaluation/plots/{name}", self.evaluation_plot)
        app.router.add_get("/actions", self.actions_page)
        app.router.add_post("/actions/{action}", self.action)
        app.router.add_static("/static/", HERE / "static", show_index=False, follow_symlinks=False)
        return app

    async def _blocking(self, pool: str, fn, *args):
        """Run `fn` on the server's `pool` ("compute" or "store"), at most MAX_PAGES_AT_ONCE at once."""
        if self._pages is None:
            self._pages = asyncio.Semaphore(MAX_PAGES_AT_ONCE)
        try:
            await asyncio.wait_for(self._pages.acquire(), PAGE_WAIT_S)
        except asyncio.TimeoutError:
            raise Overloaded("the dashboard is busy with other pages; retry in a moment") from None
        try:
            return await getattr(self.work, pool).run(fn, *args)
        finally:
            self._pages.release()

    def _render(self, request: web.Request, template: str, status: int = 200, title: str = "Sign in", **values) -> web.Response:
        session: Session | None = request.get(SESSION)
        principal: Principal | None = request.get(PRINCIPAL)
        html = self.templates.get_template(template).render(
            principal=principal,
            is_admin=principal is not None and principal.role >= Role.ADMIN,
            csrf=session.csrf if session is not None else "",
            path=request.path,
            signed_in=session is not None,
            authenticated=self.sessions.authenticated,
            title=title,
            **values,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    # ---------------------------------------------------------------- checks

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Who is asking (bearer header or session cookie), what their role allows, CSRF on every
        POST; domain errors become HTTP statuses here and nowhere else."""
        try:
            response = await self._checked(request, handler)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = self._render(request, "error.html", status=exc.status, title=exc.reason,
                                    message=exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason)
        except ChronorecError as error:
            status = HTTP_OF.get(status_for(error), 500)
            response = self._render(request, "error.html", status=status, title="Refused", message=error.message)
            if status == 503:
                response.headers["Retry-After"] = "1"
        except Exception:
            log.exception("dashboard page %s failed", request.path)
            response = self._render(request, "error.html", status=500, title="Error", message="internal error (see the server log)")
        response.headers.update(SECURITY_HEADERS)
        if not request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    async def _checked(self, request: web.Request, handler):
        if request.path.startswith("/static/"):
            return await handler(request)
        header_token = bearer_token([(k.lower(), v) for k, v in request.headers.items() if k.lower() == "authorization"])
        new_session = None
        if header_token is not None:
            principal = self.sessions.principal_for_token(header_token)
            session = None
        else:
            found = self.sessions.resolve(request.cookies.get(COOKIE_NAME))
            if found is None and not self.sessions.authenticated and request.path != "/login":
                found = new_session = self.sessions.sign_in(None)  # loopback without tokens: a session for CSRF
            session, principal = found if found is not None else (None, None)
        request[SESSION], request[PRINCIPAL] = session, principal
        if request.path == "/login":
            if request.method == "POST" and not _same_origin(request):
                return self._refuse_cross_site(request)
            return await handler(request)
        if principal is None:
            return self._render(request, "login.html", status=401, next=request.path_qs, error="",
                                message="Sign in with a bearer token to see this page.")
        if request.method == "POST":
            # A browser sends the session cookie with any request to this host; a page of another
            # site can make it POST, but it cannot read this page's CSRF secret or fake Origin.
            origin = request.headers.get("Origin")
            if session is not None or origin is not None:
                if not _same_origin(request):
                    return self._refuse_cross_site(request)
            if session is not None:
                form = await request.post()
                if not self.sessions.csrf_matches(session, form.get("csrf")):
                    return self._refuse_cross_site(request)
        response = await handler(request)
        if new_session is not None:
            self._set_cookie(response, new_session[0])
        return response

    def _refuse_cross_site(self, request: web.Request) -> web.Response:
        log.warning("dashboard: refused a cross-site or unsigned POST to %s from %s", request.path, request.remote)
        return self._render(request, "error.html", status=403, title="Refused",
                            message="This form did not come from this dashboard (cross-site request refused). "
                                    "Reload the page and try again.")

    def _set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(COOKIE_NAME, session.session_id, httponly=True, samesite="Strict",
                            secure=self.settings.tls, path="/")

    def _need(self, request: web.Request, page: str) -> Principal:
        """The caller, when their role may make `page`'s gRPC call (SAME_AS_RPC); else 403."""
        principal: Principal = request[PRINCIPAL]
        role = required_role(SAME_AS_RPC[page]) or Role.READ
        if principal.role < role:
            log.warning("dashboard: %s (role %s) may not %s %s", principal.label, principal.role.name.lower(),
                        request.method, request.path)
            raise web.HTTPForbidden(
                text=f"{request.path} needs {'an' if role == Role.ADMIN else 'a'} {role.name.lower()} token; "
                     f"this one is {principal.role.name.lower()}",
            )
        return principal

    # ---------------------------------------------------------------- sign-in

    async def login_page(self, request: web.Request) -> web.Response:
        if request.get(PRINCIPAL) is not None and request.get(SESSION) is not None:
            return _redirect(_safe_next(request.query.get("next")))
        return self._render(request, "login.html", next=_safe_next(request.query.get("next")), error="", message="")

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        token = str(form.get("token", "")).strip()
        target = _safe_next(form.get("next"))
        found = self.sessions.sign_in(token)
        if found is None:
            log.warning("dashboard: sign-in with an unknown token from %s", request.remote)
            return self._render(request, "login.html", status=401, next=target, error="That token is not valid.", message="")
        session, principal = found
        log.info("dashboard: %s signed in (role %s)", principal.label, principal.role.name.lower())
        response = _redirect(target)
        self._set_cookie(response, session)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        session: Session | None = request.get(SESSION)
        if session is not None:
            self.sessions.sign_out(session.session_id)
        response = _redirect("/login")
        response.del_cookie(COOKIE_NAME, path="/")
        return response

    # ---------------------------------------------------------------- pages

    async def status_page(self, request: web.Request) -> web.Response:
        self._need(request, "status")
        view = await self._blocking("store", views.status_view, self.engine)
        return self._render(request, "status.html", view=view, refresh=STATUS_REFRESH_S, title="Status")

    async def preview_page(self, request: web.Request) -> web.Response:
        self._need(request, "preview")
        query = request.query
        user_id = query.get("user", "").strip()
        history = query.get("history", "")
        k = _int(query.get("k", "10"), "k")
        at = views.parse_time(query["at"], "at") if query.get("at") else None
        users = await self._blocking("store", views.user_ids, self.engine)
        view = None
        if user_id or history.strip():
            self._ready()
            view = await self._blocking("compute", views.preview_view, self.engine, self.settings.limits,
                                        user_id, history, at, k)
        return self._render(request, "preview.html", view=view, users=users, user_id=user_id, history=history,
                            k=k, title="User preview")

    async def item_page(self, request: web.Request) -> web.Response:
        self._need(request, "item")
        self._ready()
        at = views.parse_time(request.query["at"], "at") if request.query.get("at") else None
        view = await self._blocking("compute", views.item_view, self.engine, request.match_info["item_id"], at)
        chart = bar_chart([(b.start, b.end, b.events) for b in view.trend], label="events")
        return self._render(request, "item.html", view=view, chart=chart, title=f"Item {view.item.item_id}")

    async def evaluation_page(self, request: web.Request) -> web.Response:
        self._need(request, "evaluation")
        root = self.settings.reports
        report = await self._blocking("store", reports.load_report, root) if root is not None else None
        return self._render(request, "evaluation.html", report=report, configured=root is not None, title="Evaluation")

    async def evaluation_plot(self, request: web.Request) -> web.StreamResponse:
        self._need(request, "evaluation")
        root = self.settings.reports
        path = await self._blocking("store", reports.plot_path, root, request.match_info["name"]) if root else None
        if path is None:
            raise web.HTTPNotFound(text="no such plot in the latest report")
        return web.FileResponse(path, headers={"Content-Type": "image/png"})

    async def actions_page(self, request: web.Request) -> web.Response:
        self._need(request, "actions")
        view = await self._blocking("store", views.status_view, self.engine)
        return self._render(request, "actions.html", view=view, actions=ACTIONS, title="Actions")

    async def action(self, request: web.Request) -> web.Response:
        name = request.match_info["action"]
        if name not in ACTIONS:
            raise web.HTTPNotFound(text="no such action")
        principal = self._need(request, name)
        form = await request.post()
        fields = {key: str(form.get(key, "")).strip() for key in ("version", "percent", "min_impressions", "max_ctr_drop")}
        plan = await self._blocking("store", self._plan, name, fields)
        if form.get("confirm") != "yes":
            return self._render(request, "confirm.html", action=name, label=ACTIONS[name], plan=plan, fields=fields,
                                title="Confirm")
        outcome = await self._blocking("store", self._act, name, fields, principal)
        return self._render(request, "done.html", label=ACTIONS[name], outcome=outcome, title="Done")

    def _ready(self) -> None:
        if not self.engine.ready.is_set():
            raise Unavailable("the engine is still loading its catalog and model; retry in a moment")

    # ---------------------------------------------------------------- actions (store threads)

    def _plan(self, name: str, fields: dict[str, str]) -> str:
        """What the action will do, in words, after checking its fields (the confirmation page)."""
        serving = self.engine.serving_version() or "none"
        if name in ("activate", "canary-start"):
            versions = {v.version: v for v in self.engine.list_versions()}
            if fields["version"] not in versions:
                raise InvalidArgument("pick one of the repository's versions")
            if versions[fields["version"]].unusable_reason:
                raise InvalidArgument(f"version {fields['version']} cannot serve: {versions[fields['version']].unusable_reason}")
        if name == "activate":
            return f"Serve version {fields['version']} to everyone instead of {serving}."
        if name == "rollback":
            return f"Serve the version that was active before {serving} again."
        if name == "canary-start":
            percent, policy = self._canary_fields(fields)
            rule = (f"promote or abort by itself after {policy.min_impressions} impressions per version "
                    f"(CTR drop at most {policy.max_ctr_drop:g})" if policy.automatic else "promote or abort by hand")
            return f"Serve version {fields['version']} to {percent:g}% of users beside {serving}; {rule}."
        canary = self.engine.manager.canary_version()
        if canary is None:
            raise InvalidArgument("no canary is running")
        if name == "canary-promote":
            return f"Serve the canary {canary} to everyone."
        return f"Stop the canary {canary}: everyone is served by {serving} again."

    @staticmethod
    def _canary_fields(fields: dict[str, str]) -> tuple[float, CanaryPolicy]:
        try:
            percent = check_percent(float(fields["percent"] or "nan"))
            policy = CanaryPolicy(int(fields["min_impressions"] or 0), float(fields["max_ctr_drop"] or 0))
        except ValueError:
            raise InvalidArgument("percent, minimum impressions and CTR drop must be numbers") from None
        return percent, policy

    def _act(self, name: str, fields: dict[str, str], principal: Principal) -> str:
        engine = self.engine
        before = engine.serving_version() or ""
        try:
            if name == "activate":
                serving = engine.activate(fields["version"], wait=True)
                outcome = f"version {serving} serves"
            elif name == "rollback":
                active, serving = engine.rollback(wait=True)
                outcome = f"rolled back: version {serving} serves"
            elif name == "canary-start":
                percent, policy = self._canary_fields(fields)
                plan = engine.start_canary(fields["version"], percent, policy)
                outcome = f"canary {plan.candidate} serves {plan.percent:g}% of users"
            elif name == "canary-promote":
                outcome = f"canary promoted: version {engine.promote_canary()} serves"
            else:
                outcome = f"canary {engine.abort_canary()} aborted: version {engine.serving_version()} serves"
        except ChronorecError as error:
            audit.info("dashboard action refused: %s %s by=%s serving=%s: %s", name, fields.get("version") or "-",
                       principal.label, before, error.message)
            raise
        audit.info("dashboard action: %s %s by=%s before=%s: %s", name, fields.get("version") or "-", principal.label,
                   before, outcome)
        return outcome


def _redirect(target: str) -> web.Response:
    """303 See Other: after a form, the browser GETs `target` (a reload does not post again)."""
    return web.Response(status=303, headers={"Location": target})


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"{what} must be a whole number, got {text[:20]!r}") from None


class RunningDashboard:
    """The dashboard serving on its own event loop thread (so no page ever waits in gRPC's loop)."""

    def __init__(self, dashboard: Dashboard, events, runner: web.AppRunner, port: int, url: str):
        self.dashboard = dashboard
        self.events = events
        self.runner = runner
        self.port = port
        self.url = url

    def stop(self) -> None:
        self.events.run(self.runner.cleanup(), timeout=10)
        self.events.close()


def start_dashboard(engine: ChronorecEngine, executors: Executors, tokens: TokenTable | None,
                    settings: DashboardSettings, events) -> RunningDashboard:
    """Bind and serve the dashboard on `events` (an EventLoopThread of its own); raises
    SecurityConfigError for a public address without tokens, OSError when the port is taken."""
    check_dashboard_bind_policy(settings.host, tokens)
    dashboard = Dashboard(engine, executors, SessionStore(tokens), settings)
    context = ssl_context(settings)

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(dashboard.application(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context, backlog=64)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        port = runner.addresses[0][1]
        return runner, port

    try:
        runner, port = events.run(start(), timeout=30)
    except BaseException:
        events.close()
        raise
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"{'https' if settings.tls else 'http'}://{host}:{port}/"
    if tokens is None:
        log.warning("dashboard without bearer tokens: anyone on this machine may view and act at %s", url)
    return RunningDashboard(dashboard, events, runner, port, url)
