"""The hospital console (Starlette + Jinja2): the pages where a data steward reviews quarantine,
decides studies, sets the privacy budget and retires models, and where an auditor searches the
audit (docs/console.md).

A thin edge like the FHIR REST one: every decision goes to the use case that the gRPC edge calls
(`Gateway.resolve_quarantine`, `StudyReview.review/decide`) or to the console's own use cases
(`core/console.py`), with the signed-in person as the actor; nothing is decided here. What is
here is what a browser needs:

- sign-in through the hospital's OpenID Connect provider (`fibemrss.platform.oidc`), the person's
  groups mapped to console roles, authorized per action by `fibemrss.platform.authorization`
  (CONSOLE_RULES);
- server-side sessions that expire (`fibemrss.platform.web_sessions`), a cookie holding only a
  random id (HttpOnly, SameSite=Lax, Secure and `__Host-` under TLS);
- a CSRF token in every form, checked on every POST before anything else is read;
- plain HTML forms, no script needed; headings, labels and landmarks for screen readers; a
  Content-Security-Policy that allows nothing but this console's own files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from fibemrss.domain import errors
from fibemrss.domain.study import study_to_json
from fibemrss.domain.tasks import TASKS, get_task
from fibemrss.platform.authorization import CONSOLE_RULES, console_authorize
from fibemrss.platform.console_config import ConsoleConfig
from fibemrss.platform.http_server import RunningHttp, http_status_for, start_http
from fibemrss.platform.oidc import OidcClient
from fibemrss.platform.web_sessions import SessionStore, WebSession
from services.emr_gateway.core.console import HospitalConsole, audit_query
from services.emr_gateway.core.quarantine_review import Correction
from services.emr_gateway.core.study_decisions import StudyReview
from services.emr_gateway.core.use_cases import Gateway, QuarantineStatus

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 1024 * 1024  # a study document is the largest thing a form carries
ASSETS = files("services.emr_gateway.edges.console")
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
NAV = [  # (key, path, label, the action its page needs)
    ("quarantine", "/quarantine", "Quarantine", "console.read_quarantine"),
    ("studies", "/studies", "Studies", "console.read"),
    ("privacy", "/privacy", "Privacy", "console.read"),
    ("models", "/models", "Models", "console.read"),
    ("consent", "/consent", "Consent", "console.read"),
    ("audit", "/audit", "Audit", "console.search_audit"),
    ("federation", "/federation", "Federation", "console.read"),
]

Page = Callable[[Request, WebSession, dict[str, str]], Awaitable[Response]]


class CsrfRefused(errors.PermissionDenied):
    pass


@dataclass
class ConsoleDeps:
    hospital: str
    gateway: Gateway
    studies: StudyReview
    console: HospitalConsole
    oidc: OidcClient
    sessions: SessionStore
    secure_cookies: bool  # served over TLS: Secure, __Host- cookies


def actor_of(session: WebSession, hospital: str) -> str:
    """How a person is written in the audit: their name and provider subject, and the role they
    acted in ("Dana Reyes [oidc 4f2c] as steward@h1")."""
    role = "steward" if "steward" in session.person.roles else "auditor"
    return f"{session.person.name} [oidc {session.person.subject}] as {role}@{hospital}"


def safe_next(path: str) -> str:
    """A local path to return to after sign-in; anything else (another site) is the home page."""
    if path.startswith("/") and not path.startswith("//") and "\\" not in path and "\n" not in path:
        return path
    return "/"


class ConsoleWeb:
    def __init__(self, deps: ConsoleDeps) -> None:
        self.d = deps
        self.cookie = "__Host-fibemrss-console" if deps.secure_cookies else "fibemrss-console"
        # The browser's half of a pending sign-in (oidc.OidcClient.begin), scoped to the callback.
        self.signin_cookie = "fibemrss-console-signin"
        self.templates = Environment(
            loader=FileSystemLoader(str(ASSETS / "templates")),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = lambda t: "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S UTC")

    # -- plumbing ----------------------------------------------------------------------------------
    def app(self) -> Starlette:
        p = self.page
        routes = [
            Route("/", p("console.read", self.home), methods=["GET"]),
            Route("/login", self.login, methods=["GET"]),
            Route("/oidc/callback", self.callback, methods=["GET"]),
            Route("/logout", p("", self.logout), methods=["POST"]),
            Route("/static/console.css", self.stylesheet, methods=["GET"]),
            Route("/quarantine", p("console.read_quarantine", self.quarantine), methods=["GET"]),
            Route(
                "/quarantine/{id:int}", p("console.read_quarantine", self.quarantine_entry), methods=["GET"]
            ),
            Route("/quarantine/{id:int}", p("console.resolve_quarantine", self.resolve), methods=["POST"]),
            Route("/studies", p("console.read", self.studies), methods=["GET"]),
            Route("/studies/review", p("console.review_study", self.review_study), methods=["POST"]),
            Route("/studies/decide", p("console.decide_study", self.decide_study), methods=["POST"]),
            Route("/privacy", p("console.read", self.privacy), methods=["GET"]),
            Route("/privacy/budget", p("console.set_budget", self.set_budget), methods=["POST"]),
            Route("/models", p("console.read", self.models), methods=["GET"]),
            Route("/models/retire", p("console.retire_model", self.retire_model), methods=["POST"]),
            Route("/consent", p("console.read", self.consent), methods=["GET"]),
            Route("/audit", p("console.search_audit", self.audit), methods=["GET"]),
            Route("/audit.csv", p("console.search_audit", self.audit_csv), methods=["GET"]),
            Route("/federation", p("console.read", self.federation), methods=["GET"]),
        ]
        return Starlette(routes=routes)

    def render(
        self, template: str, status: int = 200, session: WebSession | None = None, **context: Any
    ) -> HTMLResponse:
        flash = ""
        if session is not None:
            flash, session.flash = session.flash, ""

        def may(action: str) -> bool:
            """Whether the signed-in person may take `action`: pages show only what they can do."""
            return session is not None and bool(session.person.roles & CONSOLE_RULES.get(action, frozenset()))

        html = self.templates.get_template(template).render(
            hospital=self.d.hospital,
            nav=NAV,
            may=may,
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
        return self.d.sessions.get(session_id) if session_id else None

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
                    console_authorize(session.person.name, session.person.roles, action)
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

    def actor(self, session: WebSession) -> str:
        return actor_of(session, self.d.hospital)

    # -- sign-in -----------------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        try:
            url, browser = await run_in_threadpool(
                self.d.oidc.begin, safe_next(request.query_params.get("next", "/"))
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
            secure=self.d.secure_cookies,
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
                self.d.oidc.finish,
                q.get("state", ""),
                q.get("code", ""),
                q.get("iss"),
                request.cookies.get(self.signin_cookie, ""),
            )
        except Exception as exc:  # noqa: BLE001
            return self.error_page(exc, None)
        session = self.d.sessions.create(person)
        await run_in_threadpool(
            self.d.console.note_sign_in, actor_of(session, self.d.hospital), ",".join(sorted(person.roles))
        )
        response = RedirectResponse(safe_next(next_path), 303, SECURITY_HEADERS)
        response.set_cookie(
            self.cookie,
            session.id,
            max_age=int(self.d.sessions.max_seconds),
            path="/",
            secure=self.d.secure_cookies,
            httponly=True,
            samesite="lax",
        )
        response.delete_cookie(self.signin_cookie, path="/oidc/callback")
        return response

    async def logout(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        self.d.sessions.end(session.id)
        response = self.render("signed_out.html", 200, None, active="")
        response.delete_cookie(
            self.cookie, path="/", secure=self.d.secure_cookies, httponly=True, samesite="lax"
        )
        return response

    async def stylesheet(self, request: Request) -> Response:
        css = (ASSETS / "static" / "console.css").read_bytes()
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    # -- pages -------------------------------------------------------------------------------------
    async def home(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        stats = await run_in_threadpool(self.d.gateway.stats)
        return self.render("home.html", session=session, active="", stats=stats)

    async def quarantine(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        asked = request.query_params.get("status", "open")
        status: QuarantineStatus = (
            "accepted" if asked == "accepted" else "rejected" if asked == "rejected" else "open"
        )
        page = await run_in_threadpool(
            self.d.gateway.list_quarantine, self.actor(session), "console quarantine review", status, 0, 200
        )
        return self.render("quarantine.html", session=session, active="quarantine", page=page, shown=status)

    async def quarantine_entry(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        entry_id = int(request.path_params["id"])
        entry = await run_in_threadpool(
            self.d.gateway.read_quarantined, self.actor(session), entry_id, "console quarantine review"
        )
        return self.render("quarantine_entry.html", session=session, active="quarantine", entry=entry)

    async def resolve(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        entry_id = int(request.path_params["id"])
        resolution = form.get("resolution", "")
        accept = {"accept": True, "reject": False}.get(resolution)
        corrections: list[Correction] = []
        problems: list[errors.FieldProblem] = []
        for key, value in form.items():
            if not key.startswith("value-") or not value.strip():
                continue
            index = key.removeprefix("value-")
            try:
                corrections.append(
                    Correction(int(index), float(value), form.get(f"unit-{index}", "").strip() or None)
                )
            except ValueError:
                problems.append(errors.FieldProblem(f"observation {index} value", "must be a number"))
        if problems:
            raise errors.InvalidArgument("invalid corrections", problems)
        entry, _ = await run_in_threadpool(
            self.d.gateway.resolve_quarantine,
            self.actor(session),
            entry_id,
            accept,
            corrections,
            form.get("reason", ""),
        )
        verb = "accepted" if accept else "rejected"
        fixed = f" with {len(corrections)} correction(s)" if corrections else ""
        return self.done(session, f"Record {entry.id} {verb}{fixed}.", "/quarantine")

    async def studies(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        decisions = await run_in_threadpool(self.d.console.study_decisions)
        shipped = sorted(TASKS)
        return self.render(
            "studies.html", session=session, active="studies", decisions=decisions, shipped=shipped
        )

    def _document(self, form: dict[str, str]) -> bytes:
        if form.get("document", "").strip():
            return form["document"].encode("utf-8")
        name = form.get("shipped", "")
        if name in TASKS:
            return json.dumps(study_to_json(TASKS[name]), indent=2).encode()
        raise errors.InvalidArgument(
            "no study",
            [errors.FieldProblem("document", "paste the proposed study document, or pick a study")],
        )

    async def review_study(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        document = self._document(form)
        review = await run_in_threadpool(self.d.studies.review, self.actor(session), document)
        previous = await run_in_threadpool(self.d.console.approved_before, review.task)
        return self.render(
            "study_review.html",
            session=session,
            active="studies",
            r=review,
            document=document.decode("utf-8"),
            previous=previous,
        )

    async def decide_study(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        document = self._document(form)
        decision = form.get("decision", "")
        if decision not in ("approve", "refuse"):
            raise errors.InvalidArgument(
                "no decision", [errors.FieldProblem("decision", "choose approve or refuse")]
            )
        d = await run_in_threadpool(
            self.d.studies.decide,
            self.actor(session),
            document,
            decision == "approve",
            form.get("reason", ""),
        )
        return self.done(session, f"Study {d.study} {d.decision} ({d.study_hash[:12]}).", "/studies")

    async def privacy(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        datasets = await run_in_threadpool(self.d.console.privacy)
        return self.render("privacy.html", session=session, active="privacy", datasets=datasets)

    async def set_budget(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        dataset = form.get("dataset", "")
        budget = await run_in_threadpool(
            self.d.console.set_budget,
            self.actor(session),
            dataset,
            form.get("epsilon", ""),
            form.get("delta", ""),
        )
        return self.done(
            session,
            f"Budget of {dataset} set to epsilon {budget.epsilon:g}, delta {budget.delta:g}.",
            "/privacy",
        )

    async def models(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        by_task = await run_in_threadpool(self.d.console.models)
        return self.render("models.html", session=session, active="models", by_task=by_task)

    async def retire_model(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        task = form.get("task", "")
        version = await run_in_threadpool(
            self.d.console.retire_model,
            self.actor(session),
            task,
            form.get("version", ""),
            form.get("reason", ""),
        )
        return self.done(session, f"Version {version} of {task} retired.", "/models")

    async def consent(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        summary = await run_in_threadpool(self.d.console.consent, self.actor(session))
        return self.render("consent.html", session=session, active="consent", s=summary)

    def _query(self, request: Request) -> tuple[dict[str, str], bool]:
        q = {
            k: request.query_params.get(k, "") for k in ("patient_key", "caller", "action", "since", "until")
        }
        return q, any(q.values()) or request.query_params.get("search") == "1"

    async def audit(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        q, asked = self._query(request)
        rows = None
        if asked:
            query = audit_query(**q)
            rows = await run_in_threadpool(self.d.console.search_audit, self.actor(session), query)
        csv_link = "/audit.csv?" + urlencode(q, quote_via=quote)
        return self.render("audit.html", session=session, active="audit", q=q, rows=rows, csv_link=csv_link)

    async def audit_csv(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        q, _ = self._query(request)
        rows = await run_in_threadpool(
            self.d.console.search_audit, self.actor(session), audit_query(**q), True
        )
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["id", "at", "actor", "action", "purpose", "subject"])
        for r in rows:
            writer.writerow(
                [
                    r.id,
                    r.at.isoformat(),
                    *(spreadsheet_safe(v) for v in (r.actor, r.action, r.purpose, r.subject)),
                ]
            )
        headers = {
            **SECURITY_HEADERS,
            "Content-Disposition": f'attachment; filename="audit-{self.d.hospital}.csv"',
        }
        return Response(out.getvalue(), 200, headers, media_type="text/csv; charset=utf-8")

    async def federation(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        studies = await run_in_threadpool(self.d.console.federation)
        why = await run_in_threadpool(self._export_problems, [s.study for s in studies])
        return self.render("federation.html", session=session, active="federation", studies=studies, why=why)

    def _export_problems(self, names: list[str]) -> dict[str, str]:
        """Why each study known here by name may not export now ("" when it may), as the
        gateway's StreamTrainingExamples decides it."""
        out = {}
        for name in names:
            try:
                out[name] = self.d.studies.export_problem(get_task(name))
            except errors.DomainError:
                out[name] = "not a study this gateway knows by name"
        return out


def spreadsheet_safe(value: str) -> str:
    """A cell a spreadsheet will not run as a formula (CSV injection): text starting with = + - @
    or a control character gets a leading apostrophe."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def start_console(
    config: ConsoleConfig,
    hospital: str,
    gateway: Gateway,
    studies: StudyReview,
    console: HospitalConsole,
    sessions: SessionStore | None = None,
) -> tuple[RunningHttp, ConsoleWeb]:
    """Serves the console where `config` says; returns it and its pages (tests reach the session
    store through them)."""
    oidc = OidcClient(config.oidc)
    deps = ConsoleDeps(
        hospital,
        gateway,
        studies,
        console,
        oidc,
        sessions or SessionStore(config.idle_seconds, config.max_seconds),
        secure_cookies=config.listen.tls is not None,
    )
    web = ConsoleWeb(deps)
    running = start_http("console", web.app(), config.listen, client_certificates=False)
    # The provider sends people back to the address the console is reached at: the configured
    # public URL, else the one it bound (port 0 is known only now; no sign-in has begun yet).
    oidc.settings = replace(config.oidc, redirect_uri=config.redirect_uri(running.base_url))
    return running, web
