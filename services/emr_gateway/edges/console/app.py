"""The hospital console: the pages where a data steward reviews quarantine, decides studies,
sets the privacy budget and retires models, and where an auditor searches the audit
(docs/console.md).

A thin edge like the FHIR REST one: every decision goes to the use case that the gRPC edge calls
(`Gateway.resolve_quarantine`, `StudyReview.review/decide`) or to the console's own use cases
(`core/console.py`), with the signed-in person as the actor; nothing is decided here. Sign-in,
sessions, CSRF, authorization by `CONSOLE_RULES`, the layout and errors as pages are the shared
`fibemrss.platform.web_console.WebConsole`'s.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fibemrss.domain import errors
from fibemrss.domain.study import study_to_json
from fibemrss.domain.tasks import TASKS, get_task
from fibemrss.platform.authorization import CONSOLE_RULES
from fibemrss.platform.console_config import ConsoleConfig
from fibemrss.platform.http_server import RunningHttp, start_http
from fibemrss.platform.oidc import OidcClient
from fibemrss.platform.web_console import SECURITY_HEADERS, ConsoleSetup, NavItem, WebConsole
from fibemrss.platform.web_sessions import SessionStore, WebSession
from services.emr_gateway.core.console import HospitalConsole, audit_query
from services.emr_gateway.core.quarantine_review import Correction
from services.emr_gateway.core.study_decisions import StudyReview
from services.emr_gateway.core.use_cases import Gateway, QuarantineStatus

NAV: list[NavItem] = [
    ("quarantine", "/quarantine", "Quarantine", "console.read_quarantine"),
    ("studies", "/studies", "Studies", "console.read"),
    ("privacy", "/privacy", "Privacy", "console.read"),
    ("models", "/models", "Models", "console.read"),
    ("consent", "/consent", "Consent", "console.read"),
    ("audit", "/audit", "Audit", "console.search_audit"),
    ("federation", "/federation", "Federation", "console.read"),
]


@dataclass
class ConsoleDeps:
    hospital: str
    gateway: Gateway
    studies: StudyReview
    console: HospitalConsole
    oidc: OidcClient
    sessions: SessionStore
    secure_cookies: bool  # served over TLS: Secure, __Host- cookies


class ConsoleWeb(WebConsole):
    def __init__(self, deps: ConsoleDeps) -> None:
        self.d = deps
        super().__init__(
            ConsoleSetup(
                deps.hospital,
                f"hospital {deps.hospital}",
                Path(str(files("services.emr_gateway.edges.console") / "templates")),
                NAV,
                CONSOLE_RULES,
                deps.oidc,
                deps.sessions,
                deps.secure_cookies,
                on_sign_in=deps.console.note_sign_in,
            )
        )

    def page_routes(self) -> list[Route]:
        p = self.page
        return [
            Route("/", p("console.read", self.home), methods=["GET"]),
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

    # -- pages -------------------------------------------------------------------------------------
    async def home(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        stats = await run_in_threadpool(self.d.gateway.stats)
        return self.render("home.html", session=session, active="", stats=stats, hospital=self.d.hospital)

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
