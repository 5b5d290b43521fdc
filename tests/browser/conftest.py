"""The hospital console in a real browser: a gateway over a real PostgreSQL (embedded), its console
served over loopback, a real OpenID Connect provider (npm's oidc-provider, tests/browser/provider)
and Debian's headless chromium driven by selenium. `make browser-tools` installs what they need;
without it these tests skip, saying what is missing.

One hospital, one provider and one browser for the module (starting chromium is the slow part);
each test signs in as the person it needs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.db.privacy_ledger import PrivacyLedger
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.privacy import PrivacySpend
from fibemrss.domain.records import LOINC, Code, Observation, PatientRecord, Provenance
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.platform.config import EdgeListen
from fibemrss.platform.console_config import ConsoleConfig
from fibemrss.platform.oidc import OidcSettings
from fibemrss.platform.web_sessions import SessionStore
from fibemrss.tools.bench.inference_bench import sample_model_version
from services.emr_gateway.adapters.console_reads import ConsoleReads
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.console import HospitalConsole
from services.emr_gateway.core.ingestion import Candidate
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.study_decisions import StudyReview
from services.emr_gateway.core.use_cases import Gateway
from services.emr_gateway.edges.console.app import ConsoleWeb, start_console
from tests.waiting import wait_until

PROVIDER_DIR = Path(__file__).parent / "provider"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
CLIENT_ID = "fibemrss-console-h1"
CLIENT_SECRET = "console-test-secret-" + uuid.uuid4().hex
ROLES = {"fibemrss-stewards": "steward", "fibemrss-auditors": "auditor"}
PSEUDONYMS = Pseudonymizer(b"console-browser-test-pseudonym-key")


def _missing() -> str:
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        return "the test OpenID Connect provider is not installed (make browser-tools)"
    if not shutil.which("node"):
        return "node is not installed"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "Debian's chromium and chromium-driver are not installed (make browser-tools)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    return ""


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    if reason := _missing():
        pytest.skip(reason)


class Clock:
    """The sessions' clock, advanced by a test instead of waiting for a session to expire."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@dataclass
class Hospital:
    db: Database
    gateway: Gateway
    review: StudyReview
    web: ConsoleWeb
    base_url: str
    clock: Clock
    quarantined_key: str

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.db.transaction() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())


def patient(pid: str, age: float, systolic: float) -> PatientRecord:
    obs = (
        Observation(
            Code(LOINC, "8480-6", "Systolic blood pressure"), systolic, "mm[Hg]", source_id=f"{pid}-bp"
        ),
        Observation(Code(LOINC, "8867-4", "Heart rate"), 72.0, "/min", source_id=f"{pid}-hr"),
    )
    return PatientRecord(
        pid, Provenance("ehr", pid, f"sha-{pid}"), sex="female", age_years=age, observations=obs
    )


def consent(identifier: str, decision: str) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": f"consent-{identifier}",
        "meta": {"source": "ehr"},
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"value": identifier}},
        "dateTime": "2026-11-01T10:00:00Z",
        "provision": {"type": decision},
    }


@pytest.fixture(scope="module")
def hospital(postgres_server: str) -> Iterator[Hospital]:
    url = ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")
    migrate(url, "hospital")
    db = Database(url)
    store = GatewayStore(db)
    review = StudyReview("h1", store, StudyStore(db))
    gateway = Gateway(store, PSEUDONYMS, studies=review)
    records = [patient(f"p{i}", 30 + i % 40, 110 + i % 30) for i in range(60)]
    records.append(patient("q1", 58, 1300))  # a systolic pressure typed with a zero too many
    result = gateway.ingest_candidates(
        [Candidate(i, r.provenance.source_id, r) for i, r in enumerate(records)]
    )
    fates = [o.fate for o in result.outcomes]
    assert fates.count("accepted") == 60 and fates[-1] == "quarantined"
    quarantined_key = result.outcomes[-1].patient_key
    for i, decision in enumerate(["deny", "deny", "permit"]):
        gateway.record_consent("ingest@h1", consent(f"c{i}", decision))
    models = ModelStore(db)
    for v in (1, 2):
        models.publish(sample_model_version(version=v, seed=v), actor="agent@h1")
    ledger = PrivacyLedger(db)
    ledger.set_budget("emr", 8.0, 1e-3, "operator@h1")
    ledger.record(
        PrivacySpend("emr", HEART_DISEASE_V1.name, b"\x01" * 16, "dp-sgd", 2, 2, 1.25, 1e-5), "agent@h1"
    )
    clock = Clock()
    config = ConsoleConfig(
        EdgeListen("127.0.0.1", 0, None),
        None,
        OidcSettings("", CLIENT_ID, CLIENT_SECRET, "", ROLES, scopes="openid profile groups"),
        idle_seconds=1800,
        max_seconds=8 * 3600,
    )
    running, web = start_console(
        config, "h1", gateway, review, HospitalConsole(ConsoleReads(db)), SessionStore(1800, 8 * 3600, clock)
    )
    redirect = web.d.oidc.settings.redirect_uri
    provider = subprocess.Popen(
        ["node", "provider.mjs", redirect, CLIENT_ID, CLIENT_SECRET],
        cwd=PROVIDER_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert provider.stdout is not None
        issuer = json.loads(provider.stdout.readline())["issuer"]
        # The provider's address is known only once it serves (port 0); the console reads its
        # discovery document at the first sign-in.
        web.d.oidc.settings = replace(web.d.oidc.settings, issuer=issuer)
        yield Hospital(db, gateway, review, web, running.base_url, clock, quarantined_key)
    finally:
        provider.terminate()
        provider.wait(timeout=10)
        running.stop()
        db.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-proxy-server",
        "--window-size=1280,1000",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: Any, hospital: Any, login: str, path: str = "/") -> None:
    """Signs in through the provider's own login page, as a person would, at the console of
    `hospital` (anything with a `base_url`: the federation's console too)."""
    from selenium.webdriver.common.by import By

    # Every cookie, the console's and the provider's (whatever page is open): each sign-in starts afresh.
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.get(hospital.base_url + path)
    wait_until(
        lambda: driver.find_elements(By.NAME, "login"),
        20,
        f"the provider's login page (at {driver.current_url}: {driver.find_element(By.TAG_NAME, 'body').text[:300]!r})",
    )
    driver.find_element(By.NAME, "login").send_keys(login)
    driver.find_element(By.NAME, "password").send_keys("correct horse battery staple")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_until(lambda: driver.current_url.startswith(hospital.base_url), 20, "the console after sign-in")
