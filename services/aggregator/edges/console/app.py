"""The federation operator's console (docs/console.md): federations and their rounds over time,
each hospital's part, and the proposed studies, for people holding the `operator` console role
(operator@central's reads), signed in through OpenID Connect. Read-only: starting and stopping
federations stays with the CLI and its certificate. Sign-in, sessions, CSRF, authorization by
`CENTRAL_CONSOLE_RULES`, the layout and errors as pages are the shared `WebConsole`'s.
"""

from __future__ import annotations

from dataclasses import replace
from importlib.resources import files
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fibemrss.platform.authorization import CENTRAL_CONSOLE_RULES
from fibemrss.platform.console_config import ConsoleConfig
from fibemrss.platform.http_server import RunningHttp, start_http
from fibemrss.platform.oidc import OidcClient
from fibemrss.platform.web_console import ConsoleSetup, NavItem, WebConsole
from fibemrss.platform.web_sessions import SessionStore, WebSession
from services.aggregator.core.federation_console import FederationConsole

NAV: list[NavItem] = [
    ("federations", "/", "Federations", "console.read_federations"),
    ("proposals", "/proposals", "Proposals", "console.read_federations"),
]


class FederationConsoleWeb(WebConsole):
    def __init__(
        self, console: FederationConsole, oidc: OidcClient, sessions: SessionStore, secure_cookies: bool
    ) -> None:
        self.console = console
        super().__init__(
            ConsoleSetup(
                "central",
                "the federation",
                Path(str(files("services.aggregator.edges.console") / "templates")),
                NAV,
                CENTRAL_CONSOLE_RULES,
                oidc,
                sessions,
                secure_cookies,
                on_sign_in=console.note_sign_in,
            )
        )

    def page_routes(self) -> list[Route]:
        p = self.page
        return [
            Route("/", p("console.read_federations", self.federations), methods=["GET"]),
            Route("/proposals", p("console.read_federations", self.proposals), methods=["GET"]),
        ]

    async def federations(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        views = await run_in_threadpool(self.console.federations, self.actor(session))
        return self.render("federations.html", session=session, active="federations", federations=views)

    async def proposals(self, request: Request, session: WebSession, form: dict[str, str]) -> Response:
        views = await run_in_threadpool(self.console.proposals, self.actor(session))
        return self.render("proposals.html", session=session, active="proposals", proposals=views)


def start_federation_console(
    config: ConsoleConfig, console: FederationConsole, sessions: SessionStore | None = None
) -> tuple[RunningHttp, FederationConsoleWeb]:
    """Serves the console where `config` says (as the hospital's start_console does)."""
    oidc = OidcClient(config.oidc)
    web = FederationConsoleWeb(
        console,
        oidc,
        sessions or SessionStore(config.idle_seconds, config.max_seconds),
        secure_cookies=config.listen.tls is not None,
    )
    running = start_http("federation-console", web.app(), config.listen, client_certificates=False)
    oidc.settings = replace(config.oidc, redirect_uri=config.redirect_uri(running.base_url))
    return running, web
