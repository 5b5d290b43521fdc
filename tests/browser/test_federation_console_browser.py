"""The federation operator's console at the aggregator, in headless chromium, signed in through
the real OpenID Connect provider: federations with their rounds (a failed one with its reason),
each hospital's part, the proposals; a person without the operator group is refused; axe-core
finds no serious or critical violation. Screenshots with FIBEMRSS_CONSOLE_SCREENSHOTS=1."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate
from fibemrss.db.pool import Database
from fibemrss.domain.study import study_hash
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.platform.config import EdgeListen
from fibemrss.platform.console_config import ConsoleConfig
from fibemrss.platform.oidc import OidcSettings
from fibemrss.tools.study_review import document_of
from services.aggregator.adapters.console_reads import FederationConsoleReads
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.federation_console import FederationConsole
from services.aggregator.core.proposals import Proposal
from services.aggregator.core.round_state import FederationSettings
from services.aggregator.edges.console.app import start_federation_console
from tests.browser.conftest import CLIENT_SECRET, PROVIDER_DIR, sign_in
from tests.browser.test_console_browser import accessibility_problems, by, screenshot

CLIENT = "fibemrss-federation-console"


@dataclass
class Central:
    base_url: str
    db: Database


@pytest.fixture(scope="module")
def central(postgres_server: str) -> Iterator[Central]:
    url = ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")
    migrate(url, "aggregator")
    db = Database(url)
    store = AggregatorStore(db)
    digest = study_hash(HEART_DISEASE_V1)
    store.add_proposal(
        Proposal(
            HEART_DISEASE_V1.name,
            digest,
            HEART_DISEASE_V1.version,
            document_of(HEART_DISEASE_V1),
            "operator@central",
        )
    )
    settings = FederationSettings(
        HEART_DISEASE_V1.name, 3, 2, 5.0, 600.0, ("h1", "h2"), False, 1, uuid.uuid4().bytes, digest
    )
    store.create_federation(settings)
    with store.submission(settings.task, 0, "h1", 1) as upload:
        upload.add(0, b"ciphertext")
    store.fail_round(settings, 0, "quorum 2 not reached by the deadline: 1 submission", 1)
    config = ConsoleConfig(
        EdgeListen("127.0.0.1", 0, None),
        None,
        OidcSettings(
            "", CLIENT, CLIENT_SECRET, "", {"fibemrss-operators": "operator"}, scopes="openid profile groups"
        ),
        idle_seconds=1800,
        max_seconds=3600,
    )
    running, web = start_federation_console(config, FederationConsole(FederationConsoleReads(db, store)))
    provider = subprocess.Popen(
        ["node", "provider.mjs", web.setup.oidc.settings.redirect_uri, CLIENT, CLIENT_SECRET],
        cwd=PROVIDER_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert provider.stdout is not None
        issuer = json.loads(provider.stdout.readline())["issuer"]
        web.setup.oidc.settings = replace(web.setup.oidc.settings, issuer=issuer)
        yield Central(running.base_url, db)
    finally:
        provider.terminate()
        provider.wait(timeout=10)
        running.stop()
        db.close()


def test_the_operator_sees_each_federation_its_rounds_hospitals_and_proposals(
    browser: Any, central: Central
) -> None:
    sign_in(browser, central, "operator")
    main = browser.find_element(by("TAG_NAME"), "main").text
    assert HEART_DISEASE_V1.name in main
    assert "quorum 2 not reached by the deadline: 1 submission" in main  # round 0 failed, and why
    rows = {
        r.find_element(by("TAG_NAME"), "th").text: r.text
        for r in browser.find_elements(by("XPATH"), "//table[caption[starts-with(., 'Hospitals')]]/tbody/tr")
    }
    assert rows["h1"].startswith("h1 yes 1 0") and "not yet" in rows["h2"]
    assert not accessibility_problems(browser)
    screenshot(browser, "federation-console")
    browser.get(central.base_url + "/proposals")
    main = browser.find_element(by("TAG_NAME"), "main").text
    assert study_hash(HEART_DISEASE_V1)[:19] in main and "h1: yes; h2: not yet" in main
    assert not accessibility_problems(browser)
    screenshot(browser, "federation-console-proposals")
    with central.db.transaction() as cur:
        cur.execute("SELECT actor FROM audit_log WHERE action = 'console_read_federations'")
        assert {a for (a,) in cur.fetchall()} == {"Olu Operator [oidc operator] as operator@central"}


def test_a_hospital_steward_is_not_the_federation_operator(browser: Any, central: Central) -> None:
    sign_in(browser, central, "steward")
    assert browser.find_element(by("TAG_NAME"), "h1").text == "Not allowed"
    assert "no console role" in browser.find_element(by("TAG_NAME"), "main").text
