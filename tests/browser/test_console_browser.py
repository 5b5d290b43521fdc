"""The hospital console in headless chromium, signed in through a real OpenID Connect provider
(issue 26): a steward corrects a quarantined record that then reaches training exports, approves
a study that then exports, refuses another that never does, and finds all of it in the audit; an
auditor cannot approve; signed-out requests, forged CSRF tokens and expired sessions are refused;
axe-core finds no serious or critical accessibility violation on any page. Each page's screenshot
is saved under docs/console/ when FIBEMRSS_CONSOLE_SCREENSHOTS=1 (docs/console.md shows them).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.errors import FailedPrecondition
from fibemrss.domain.site_policy import approval_problem
from fibemrss.domain.study import study_hash
from fibemrss.domain.tasks import TASKS
from tests.browser.conftest import PROVIDER_DIR, Hospital, sign_in
from tests.waiting import wait_until

APPROVED = TASKS["heart-disease-noninvasive-v1"]  # cohort: 18 and older; reads age, sex, pressure...
REFUSED = TASKS["hypertension-synthea-v1"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
AXE = PROVIDER_DIR / "node_modules" / "axe-core" / "axe.min.js"
PAGES = [
    "/",
    "/quarantine",
    "/studies",
    "/privacy",
    "/models",
    "/consent",
    "/audit?caller=Dana",
    "/federation",
]


def by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def accessibility_problems(driver: Any) -> list[str]:
    """axe-core 4.x run on the page as it is: each serious or critical violation, with where."""
    driver.execute_script(AXE.read_text())
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations))"
        ".catch(e => done([{id: 'axe-error', impact: 'critical', nodes: [{target: [String(e)]}]}]));"
    )
    return [
        f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']][:3]}"
        for v in result
        if v["impact"] in ("serious", "critical")
    ]


def screenshot(driver: Any, name: str) -> None:
    if os.environ.get("FIBEMRSS_CONSOLE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def click_and_load(driver: Any, element: Any) -> None:
    """Clicks (or submits) and waits for the next page to replace this one, and to be loaded."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    page = driver.find_element(by("TAG_NAME"), "html")
    element.click()

    def replaced() -> bool:
        try:
            page.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as error:
            # Asked while Chromium swaps the documents, the old node may be reported as detached
            # ("does not belong to the document") instead of stale: the page is being replaced too.
            return "does not belong to the document" in str(error)
        return False

    wait_until(replaced, 20, "the next page")
    wait_until(lambda: driver.execute_script("return document.readyState") == "complete", 20, "the page loaded")


def session_cookie(driver: Any) -> dict[str, str]:
    return {c["name"]: c["value"] for c in driver.get_cookies() if c["name"] == "fibemrss-console"}


def csrf_of(driver: Any) -> str:
    return str(driver.find_element(by("NAME"), "csrf").get_attribute("value"))


def flash(driver: Any) -> str:
    """The page's status message; the page's whole text when it has none (an error page)."""
    found = driver.find_elements(by("CSS_SELECTOR"), "[role=status]")
    return str(found[0].text) if found else str(driver.find_element(by("TAG_NAME"), "main").text)


def agent_join_problem(hospital: Hospital, study: str) -> str:
    """What the hospital's agent decides before joining a federation of `study`: the same rule
    (`approval_problem`) over the same store (`StudyStore` of the hospital's database) that
    services/hospital_agent wires into `Participation._join_problem`."""
    task = TASKS[study]
    digest = study_hash(task)
    return approval_problem("h1", study, digest, StudyStore(hospital.db).latest_decision(study, digest))


def exported_keys(hospital: Hospital, study: str) -> set[str]:
    return {e.patient_key for e in hospital.gateway.training_examples("agent@h1", study, "training")}


def test_a_steward_corrects_approves_refuses_and_finds_it_all_in_the_audit(
    browser: Any, hospital: Hospital
) -> None:
    d = browser
    sign_in(d, hospital, "steward", "/quarantine")
    assert d.current_url == hospital.base_url + "/quarantine"
    assert "Dana Steward" in d.find_element(by("TAG_NAME"), "header").text
    screenshot(d, "quarantine")

    # Quarantine: the record held for a systolic pressure of 1300 mm[Hg], corrected to 130.
    click_and_load(d, d.find_element(by("CSS_SELECTOR"), "tbody a"))
    assert d.find_element(by("TAG_NAME"), "h1").text.startswith("Quarantined record")
    screenshot(d, "quarantine-record")
    d.find_element(by("ID"), "value-0").send_keys("130")
    d.find_element(by("ID"), "accept").click()
    d.find_element(by("ID"), "reason").send_keys("systolic pressure typed with an extra zero; chart says 130")
    click_and_load(d, d.find_element(by("CSS_SELECTOR"), "main form button[type=submit]"))
    assert re.fullmatch(r"Record \d+ accepted with 1 correction\(s\)\.", flash(d))
    [(value,)] = hospital.query(
        "SELECT o.value FROM observations o JOIN source_records r ON r.id = o.record_id "
        "WHERE r.patient_key = %s AND o.code = '8480-6' AND r.superseded_at IS NULL",
        (hospital.quarantined_key,),
    )
    assert value == 130.0

    # Studies: nothing leaves before a decision; approve one, refuse another.
    with pytest.raises(FailedPrecondition, match="not approved at hospital h1"):
        exported_keys(hospital, APPROVED.name)
    assert "not approved at hospital h1" in agent_join_problem(hospital, APPROVED.name)
    d.get(hospital.base_url + "/studies")
    screenshot(d, "studies")
    d.find_element(by("ID"), "shipped").send_keys(APPROVED.name)
    click_and_load(d, d.find_element(by("XPATH"), "//button[text()='Review the study']"))
    assert d.find_element(by("TAG_NAME"), "h1").text == f"Study {APPROVED.name}, version {APPROVED.version}"
    assert "61 of 61 patients" in d.find_element(by("TAG_NAME"), "main").text.replace("\n", " ")
    screenshot(d, "study-review")
    assert not accessibility_problems(d)
    d.find_element(by("ID"), "approve").click()
    d.find_element(by("ID"), "reason").send_keys("meets the site policy; ethics approval 2026-114")
    click_and_load(d, d.find_element(by("XPATH"), "//button[text()='Record the decision']"))
    assert flash(d) == f"Study {APPROVED.name} approved ({study_hash(APPROVED)[:12]})."
    # The agent now joins the study's federation, and its export runs, the corrected record in it.
    assert agent_join_problem(hospital, APPROVED.name) == ""
    assert hospital.quarantined_key in exported_keys(hospital, APPROVED.name)

    d.find_element(by("ID"), "shipped").send_keys(REFUSED.name)
    click_and_load(d, d.find_element(by("XPATH"), "//button[text()='Review the study']"))
    d.find_element(by("ID"), "refuse").click()
    d.find_element(by("ID"), "reason").send_keys("reads diagnoses we do not share for research")
    click_and_load(d, d.find_element(by("XPATH"), "//button[text()='Record the decision']"))
    assert flash(d) == f"Study {REFUSED.name} refused ({study_hash(REFUSED)[:12]})."
    with pytest.raises(FailedPrecondition, match="refused at hospital h1"):
        exported_keys(hospital, REFUSED.name)
    assert agent_join_problem(hospital, REFUSED.name).endswith(
        "refused at hospital h1 by Dana Steward [oidc steward] as steward@h1: "
        "reads diagnoses we do not share for research"
    )

    # Privacy: set the budget; models: retire the newest version.
    d.get(hospital.base_url + "/privacy")
    d.find_element(by("ID"), "epsilon").send_keys("6")
    click_and_load(d, d.find_element(by("XPATH"), "//button[text()='Set the budget']"))
    assert flash(d) == "Budget of emr set to epsilon 6, delta 0.001."
    screenshot(d, "privacy")
    d.get(hospital.base_url + "/models")
    d.find_element(by("ID"), "why-heart-disease-v1-2").send_keys("worse AUC on our validation set")
    click_and_load(d, d.find_element(by("XPATH"), "//input[@id='why-heart-disease-v1-2']/../button"))
    assert flash(d) == "Version 2 of heart-disease-v1 retired."
    screenshot(d, "models")

    # The audit: what the steward did, with their name and provider subject.
    d.get(hospital.base_url + "/audit")
    d.find_element(by("ID"), "caller").send_keys("Dana")
    click_and_load(d, d.find_element(by("XPATH"), "//button[text()='Search']"))
    table = d.find_element(by("TAG_NAME"), "tbody").text
    for action in (
        "resolve_quarantine:accepted",
        "study_approved",
        "study_refused",
        "set_privacy_budget",
        "retire_model",
    ):
        assert action in table, action
    assert "Dana Steward [oidc steward] as steward@h1" in table
    screenshot(d, "audit")
    actors = {a for (a,) in hospital.query("SELECT actor FROM audit_log WHERE action = 'study_approved'")}
    assert actors == {"Dana Steward [oidc steward] as steward@h1"}
    # The same search as CSV, with the browser's session.
    answer = httpx.get(
        hospital.base_url + "/audit.csv", params={"caller": "Dana"}, cookies=session_cookie(d), timeout=10
    )
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert {"study_approved", "study_refused", "retire_model"} <= {r["action"] for r in rows}
    assert "export_audit" in {a for (a,) in hospital.query("SELECT action FROM audit_log")}

    for name, path in (("consent", "/consent"), ("federation", "/federation"), ("home", "/")):
        d.get(hospital.base_url + path)
        screenshot(d, name)
    assert "Records held by the gateway" in d.find_element(by("TAG_NAME"), "main").text


def test_every_page_has_no_serious_accessibility_violation(browser: Any, hospital: Hospital) -> None:
    # The check finds what it should: an unlabelled field and an unnamed button are violations.
    browser.get(
        "data:text/html,<!doctype html><html lang=en><title>t</title><main><input><button></button></main>"
    )
    assert {p.split(" ")[0] for p in accessibility_problems(browser)} >= {"label", "button-name"}
    sign_in(browser, hospital, "steward")
    entry = hospital.query("SELECT id FROM quarantine ORDER BY id LIMIT 1")[0][0]
    problems = {}
    for path in [*PAGES, f"/quarantine/{entry}"]:
        browser.get(hospital.base_url + path)
        if found := accessibility_problems(browser):
            problems[path] = found
    assert problems == {}


def test_an_auditor_reads_and_searches_but_cannot_decide(browser: Any, hospital: Hospital) -> None:
    sign_in(browser, hospital, "auditor", "/audit")
    assert browser.current_url == hospital.base_url + "/audit"
    token, cookies = csrf_of(browser), session_cookie(browser)
    before = hospital.query("SELECT count(*) FROM study_decisions")
    # A steward's form, posted with the auditor's own valid session and token: refused.
    answer = httpx.post(
        hospital.base_url + "/studies/decide",
        data={"csrf": token, "shipped": TASKS["heart-disease-v1"].name, "decision": "approve", "reason": "x"},
        cookies=cookies,
        timeout=10,
    )
    assert answer.status_code == 403 and "may not decide study" in answer.text
    assert hospital.query("SELECT count(*) FROM study_decisions") == before
    budget = hospital.query("SELECT epsilon FROM privacy_budgets")
    answer = httpx.post(
        hospital.base_url + "/privacy/budget",
        data={"csrf": token, "dataset": "emr", "epsilon": "1000", "delta": "0.1"},
        cookies=cookies,
        timeout=10,
    )
    assert answer.status_code == 403 and hospital.query("SELECT epsilon FROM privacy_budgets") == budget
    # Held records are patient data: not the auditor's to read.
    browser.get(hospital.base_url + "/quarantine")
    assert browser.find_element(by("TAG_NAME"), "h1").text == "Not allowed"
    assert "Quarantine" not in browser.find_element(by("TAG_NAME"), "nav").text  # not offered either
    browser.get(hospital.base_url + "/studies")
    assert browser.find_element(by("TAG_NAME"), "h1").text == "Studies"  # the page reads...
    assert not browser.find_elements(by("TAG_NAME"), "textarea")  # ...and offers no review nor decision
    browser.get(hospital.base_url + "/privacy")
    assert not browser.find_elements(by("ID"), "epsilon")


def test_a_person_without_a_console_group_is_refused_at_sign_in(browser: Any, hospital: Hospital) -> None:
    sign_in(browser, hospital, "visitor")
    assert browser.find_element(by("TAG_NAME"), "h1").text == "Not allowed"
    assert "no console role" in browser.find_element(by("TAG_NAME"), "main").text
    assert not session_cookie(browser)


def test_signed_out_forged_csrf_and_expired_sessions_are_refused(browser: Any, hospital: Hospital) -> None:
    def budgets() -> list[tuple[Any, ...]]:
        return hospital.query("SELECT dataset, epsilon FROM privacy_budgets ORDER BY 1")

    before = budgets()
    form = {"dataset": "emr", "epsilon": "999", "delta": "0.5"}
    # Signed out: a page sends the browser to sign in, a form is refused; nothing changes.
    answer = httpx.get(hospital.base_url + "/audit?caller=x", timeout=10)
    assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next=")
    answer = httpx.post(hospital.base_url + "/privacy/budget", data={**form, "csrf": "x"}, timeout=10)
    assert answer.status_code == 401
    # A forged CSRF token with a real session (what a cross-site form would send).
    sign_in(browser, hospital, "steward", "/privacy")
    cookies = session_cookie(browser)
    for forged in ("", "forged", csrf_of(browser)[:-1] + "A"):
        answer = httpx.post(
            hospital.base_url + "/privacy/budget", data={**form, "csrf": forged}, cookies=cookies
        )
        assert answer.status_code == 403 and "CSRF" in answer.text
    assert budgets() == before
    # The genuine token works, which is what makes the refusals above mean something.
    answer = httpx.post(
        hospital.base_url + "/privacy/budget",
        data={**form, "epsilon": "7", "csrf": csrf_of(browser)},
        cookies=cookies,
    )
    assert answer.status_code == 303 and budgets() == [("emr", 7.0)]
    # Expired: past the idle limit the same cookie and token are refused.
    token = csrf_of(browser)
    hospital.clock.offset += hospital.web.d.sessions.idle_seconds + 1
    answer = httpx.post(hospital.base_url + "/privacy/budget", data={**form, "csrf": token}, cookies=cookies)
    assert answer.status_code == 401 and budgets() == [("emr", 7.0)]
    answer = httpx.get(hospital.base_url + "/privacy", cookies=cookies, timeout=10)
    assert answer.status_code == 303 and answer.headers["location"] == "/login?next=%2Fprivacy"
    # A replayed sign-in (the callback's state used once) is refused too.
    answer = httpx.get(hospital.base_url + "/oidc/callback", params={"state": "made-up", "code": "x"})
    assert answer.status_code == 401
