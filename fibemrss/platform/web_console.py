"""What every web console shares (the hospital's on the gateway, the federation's on the
aggregator; docs/console.md): sign-in through OpenID Connect (`oidc.py`), server-side sessions
(`web_sessions.py`), the CSRF check of every POST, authorization of each page and form by a
console rule table (`authorization.py`), server-rendered pages on one layout and stylesheet
(`web_assets/`), and errors as pages, never a traceback. A service's console subclasses
`WebConsole` with its pages and templates; nothing here decides anything about patients or
federations.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from fibemrss.domain import errors
from fibemrss.platform.authorization import console_authorize
from fibemrss.platform.http_server import http_status_for
from fibemrss.platform.oidc import OidcClient
from fibemrss.platform.web_sessions import SessionStore, WebSession

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 1024 * 1024  # a study document is the largest thing a form carries
ASSETS = files("fibemrss.platform") / "web_assets"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Page = Callable[[Request, WebSession, dict[str, str]], Awaitable[Response]]
NavItem = tuple[str, str, str, str]  # (key, path, label, the action its page needs)


class CsrfRefused(errors.PermissionDenied):
    pass


@dataclass
class ConsoleSetup:
    site: str  # the site in actors: "h1", "central"
    site_title: str  # in every page's banner: "hospital h1", "the federation"
    templates: Path  # the service's own templates (they extend the shared base.html)
    nav: Sequence[NavItem]
    rules: Mapping[str, frozenset[str]]  # console action -> roles (authorization.py)
    oidc: OidcClient
    sessions: SessionStore
    secure_cookies: bool  # served over TLS: Secure, __Host- cookies
    on_sign_in: Callable[[str, str], None] | None = None  # (actor, roles), to audit it


def safe_next(path: str) -> str:
    """A local path to return to after sign-in; anything else (another site) is the home page."""
    if path.startswith("/") and not path.startswith("//") and "\\" not in path and "\n" not in path:
        return path
    return "/"


def when(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")


class WebConsole:
    def __init__(self, setup: ConsoleSetup) -> None:
        self.setup = setup
        self.cookie = "__Host-fibemrss-console" if setup.secure_cookies else "fibemrss-console"
        # The browser's half of a pending sign-in (oidc.OidcClient.begin), scoped to the callback.
        self.signin_cookie = "fibemrss-console-signin"
        self.templates = Environment(
            loader=FileSystemLoader([str(setup.templates), str(ASSETS / "templates")]),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = when

    def routes(self) -> list[Route]:
        """The service's pages (`page_routes`) with sign-in, sign-out and the stylesheet."""
        return [
            Route("/login", self.login, methods=["GET"]),
            Route("/oidc/callback", self.callback, methods=["GET"]),
            Route("/logout", self.page("", self.logout), methods=["POST"]),
            Route("/static/console.css", self.stylesheet, methods=["GET"]),
            *self.page_routes(),
        ]

    def page_routes(self) -> list[Route]:
        return []

    def app(self) -> Starlette:
        return Starlette(routes=self.routes())

    def actor(self, session: WebSession) -> str:
        """How a person is written in the audit: their name and provider subject, and the role
        they act in ("Dana Reyes [oidc 4f2c] as steward@h1")."""
        role = sorted(session.person.roles)[0] if session.person.roles else "none"
        if "steward" in session.person.roles:
            role = "steward"
        return f"{session.person.name} [oidc {session.person.subject}] as {role}@{self.setup.site}"

    def may(self, session: WebSession | None, action: str) -> bool:
        return session is not None and bool(session.person.roles & self.setup.rules.get(action, frozenset()))

    # -- pages ---------------------------------------------------------------------------------------
    def render(
        self, template: str, status: int = 200, session: WebSession | None = None, **context: Any
    ) -> HTMLResponse:
        flash = ""
        if session is not None:
            flash, session.flash = session.flash, ""
        html = self.templates.get_template(template).render(
            site_title=self.setup.site_title,
            nav=self.setup.nav,
            may=lambda action: self.may(session, action),  # pages show only what one may do
            session=session,
            person=session.person if session else None,
            flash=flash,
            **context,
        )
        return HTMLResponse(html, status, headers=SECURITY_HEADERS)

    def error_page(self, exc: BaseException, session: WebSession | None) -> HTMLResponse:
        status = http_status_for(exc)
        if status == 500:
            log.error("console request failed", exc_info=exc)
            message, problems = "Something went wrong on the server; the log has the details.", []
        else:
            message = str(exc)
            problems = exc.violations if isinstance(exc, errors.InvalidArgument) else []
        titles = {400: "Please correct the form", 401: "Sign in again", 403: "Not allowed", 404: "Not found"}
        return self.render(
            "error.html",
            status,
            session,
            title=titles.get(status, "Cannot be done"),
            message=message,
            problems=problems,
            active="",
        )

    def session_of(self, request: Request) -> WebSession | None:
        session_id = request.cookies.get(self.cookie, "")
        return self.setup.sessions.get(session_id) if session_id else None

    def page(self, action: str, handle: Page) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint for a signed-in person allowed `action` ("" for any signed-in person). A
        POST presents the session's CSRF token before its form is used."""

        async def endpoint(request: Request) -> Response:
            session = self.session_of(request)
            if session is None:
                if request.method == "GET":
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/login?{urlencode({'next': target})}", 303, SECURITY_HEADERS)
                return self.error_page(
                    errors.Unauthenticated("you are signed out (or your session expired)"), None
                )
            try:
                form: dict[str, str] = {}
                if request.method == "POST":
                    form = await self.read_form(request)
                    if not session.csrf_matches(form.get("csrf", "")):
                        raise CsrfRefused(
                            "the form's CSRF token is not this session's; reload the page and retry"
                        )
                if action:
                    console_authorize(session.person.name, session.person.roles, action, self.setup.rules)
                return await handle(request, session, form)
            except Exception as exc:  # noqa: BLE001 - every error becomes a page, never a traceback
                return self.error_page(exc, session)

        return endpoint

    async def read_form(self, request: Request) -> dict[str, str]:
        if (
            request.headers.get("content-type", "").split(";")[0].strip()
            != "application/x-www-form-urlencoded"
        ):
            raise errors.InvalidArgument(
                "a form is expected", [errors.FieldProblem("content-type", "send the page's form")]
            )
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise errors.InvalidArgument(
                    "form too large", [errors.FieldProblem("form", f"at most {MAX_FORM_BYTES} bytes")]
                )
        try:
            return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000))
        except (UnicodeDecodeError, ValueError):
            raise errors.InvalidArgument(
                "unreadable form", [errors.FieldProblem("form", "not URL-encoded UTF-8")]
            ) from None

    def done(self, session: WebSession, message: str, to: str) -> Response:
        session.flash = message
        return RedirectResponse(to, 303, SECURITY_HEADERS)

    # -- sign-in -----------------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        try:
            url, browser = await run_in_threadpool(
                self.setup.oidc.begin, safe_next(request.query_params.get("next", "/"))
            )
        except Exception as exc:  # noqa: BLE001 - the provider unreachable is a page, not a trace
            return self.error_page(exc, None)
        response = RedirectResponse(url, 303, SECURITY_HEADERS)
        # Lax: sent on the provider's top-level redirect back to the callback, not on sub-requests.
        response.set_cookie(
            self.signin_cookie,
            browser,
            max_age=600,
            path="/oidc/callback",
            secure=self.setup.secure_cookies,
            httponly=True,
            samesite="lax",
        )
        return response

    async def callback(self, request: Request) -> Response:
        q = request.query_params
        try:
            if q.get("error"):
                raise errors.Unauthenticated(f"the provider refused the sign-in: {q.get('error', '')[:100]}")
            person, next_path = await run_in_threadpool(
                self.setup.oidc.finish,
                q.get("state", ""),
                q.get("code", ""),
                q.get("iss"),
                request.cookies.get(self.signin_cookie, ""),
            )
        except Exception as exc:  # noqa: BLE001
            return self.error_page(exc, None)
        session = self.setup.sessions.create(person)
        if self.setup.on_sign_in is not None:
            await run_in_threadpool(
                self.setup.on_sign_in, self.actor(session), ",".join(sorted(person.roles))
            )
        response = RedirectResponse(safe_next(next_path), 303, SECURITY_HEADERS)
        response.set_cookie(
            self.cookie,
            session.id,
            max_age=int(self.setup.sessions.max_seconds),
            path="/",
            secure=self.setup.secure_cookies,
            httponly=True,
            samesite="lax",
        )
        response.delete_cookie(self.signin_cookie, path="/oidc/callback")
        return response

    async def logout(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        self.setup.sessions.end(session.id)
        response = self.render("signed_out.html", 200, None, active="")
        response.delete_cookie(
            self.cookie, path="/", secure=self.setup.secure_cookies, httponly=True, samesite="lax"
        )
        return response

    async def stylesheet(self, request: Request) -> Response:
        css = (ASSETS / "static" / "console.css").read_bytes()
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})
