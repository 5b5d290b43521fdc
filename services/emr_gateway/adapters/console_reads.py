"""The console's store (PostgreSQL): the audit search, consent counts, the model store's versions,
the privacy ledger and the federation's traces in the hospital's database. Writes go through the
stores that own them (`ModelStore.retire`, `PrivacyLedger.set_budget`), each audited there."""

from __future__ import annotations

from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.db.privacy_ledger import PrivacyLedger
from fibemrss.db.study_approvals import StudyStore
from fibemrss.domain.privacy import Budget, PrivacySpend
from fibemrss.domain.site_policy import StudyDecision
from services.emr_gateway.core.console import (
    AuditQuery,
    AuditRow,
    ConsentRow,
    ConsentSummary,
    ModelRow,
    StudyActivity,
)


class ConsoleReads:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._models = ModelStore(db)
        self._ledger = PrivacyLedger(db)
        self._studies = StudyStore(db)

    def audit(self, actor: str, action: str, purpose: str, subject: str = "") -> None:
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,%s,%s,%s)",
                (actor, action, purpose, subject),
            )

    def search_audit(self, q: AuditQuery, limit: int) -> list[AuditRow]:
        # Substring matches, case-insensitive for the caller (people type part of a name).
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT id, at, actor, action, purpose, subject FROM audit_log "
                "WHERE (%(key)s = '' OR strpos(subject, %(key)s) > 0) "
                "AND (%(caller)s = '' OR strpos(lower(actor), lower(%(caller)s)) > 0) "
                "AND (%(action)s = '' OR action = %(action)s) "
                "AND (%(since)s::timestamptz IS NULL OR at >= %(since)s) "
                "AND (%(until)s::timestamptz IS NULL OR at < %(until)s) "
                "ORDER BY id DESC LIMIT %(limit)s",
                {
                    "key": q.patient_key,
                    "caller": q.caller,
                    "action": q.action,
                    "since": q.since,
                    "until": q.until,
                    "limit": limit,
                },
            )
            return [AuditRow(int(i), at, a, ac, p, s) for i, at, a, ac, p, s in cur.fetchall()]

    def consent_summary(self, latest: int) -> ConsentSummary:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT decision, count(*) FROM (SELECT DISTINCT ON (patient_key) patient_key, decision "
                "FROM consents WHERE purpose = 'research' "
                "ORDER BY patient_key, coalesce(decided_at, recorded_at) DESC, id DESC) latest GROUP BY decision"
            )
            counts = {str(d): int(n) for d, n in cur.fetchall()}
            cur.execute("SELECT count(*) FROM consents")
            row = cur.fetchone()
            decisions = int(row[0]) if row else 0
            cur.execute(
                "SELECT patient_key, decision, decided_at, recorded_by, recorded_at FROM consents "
                "ORDER BY id DESC LIMIT %s",
                (latest,),
            )
            rows = [ConsentRow(k, d, at, by, rec) for k, d, at, by, rec in cur.fetchall()]
        return ConsentSummary(counts.get("deny", 0), counts.get("permit", 0), decisions, rows)

    def model_versions(self) -> list[ModelRow]:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT m.task, m.version, m.federated_round, m.kind, m.base_version, m.standby, m.metrics, "
                "m.published_at, coalesce((SELECT a.actor FROM audit_log a WHERE a.action = 'publish_model' "
                "AND a.subject = m.task || '@' || m.version ORDER BY a.id LIMIT 1), ''), "
                "m.retired_at, coalesce(m.retired_by, ''), coalesce(m.retire_reason, '') "
                "FROM model_versions m ORDER BY m.task, m.version DESC"
            )
            return [
                ModelRow(
                    t,
                    int(v),
                    int(r),
                    k,
                    None if b is None else int(b),
                    bool(sb),
                    dict(metrics or {}),
                    pub,
                    by,
                    ret,
                    rby,
                    why,
                )
                for t, v, r, k, b, sb, metrics, pub, by, ret, rby, why in cur.fetchall()
            ]

    def retire_model(self, task: str, version: int, actor: str, reason: str) -> None:
        self._models.retire(task, version, actor, reason)

    def privacy_datasets(self) -> list[str]:
        return self._ledger.datasets()

    def privacy_budget(self, dataset: str) -> Budget | None:
        return self._ledger.budget(dataset)

    def privacy_spends(self, dataset: str) -> list[PrivacySpend]:
        return self._ledger.latest(dataset)

    def set_budget(self, dataset: str, epsilon: float, delta: float, actor: str) -> None:
        self._ledger.set_budget(dataset, epsilon, delta, actor)

    def study_decisions(self) -> list[StudyDecision]:
        return self._studies.decisions()

    def approved_document(self, study: str) -> tuple[str, str] | None:
        """(hash, canonical JSON document) of the latest approval of a study by this name."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT study_hash, document FROM study_decisions WHERE study=%s AND decision='approved' "
                "ORDER BY id DESC LIMIT 1",
                (study,),
            )
            row = cur.fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def study_activity(self) -> list[StudyActivity]:
        """Per study: training exports and refusals (audited by the gateway), privacy spends by
        round and published versions (written by the agent)."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT subject, count(*) FILTER (WHERE action = 'stream_training_examples'), max(at) "
                "FROM audit_log WHERE action IN ('stream_training_examples', 'training_export_refused') "
                "GROUP BY subject"
            )
            exports = {s: (int(n), at) for s, n, at in cur.fetchall()}
            cur.execute(
                "SELECT id, at, actor, action, purpose, subject FROM audit_log "
                "WHERE action = 'training_export_refused' ORDER BY id DESC LIMIT 200"
            )
            refused: dict[str, list[AuditRow]] = {}
            for i, at, a, ac, p, s in cur.fetchall():
                refused.setdefault(s, []).append(AuditRow(int(i), at, a, ac, p, s))
            cur.execute(
                "SELECT task, count(DISTINCT (federation_id, round)) FROM privacy_ledger GROUP BY task"
            )
            spent = {t: int(n) for t, n in cur.fetchall()}
            cur.execute(
                "SELECT task, count(*), max(federated_round), max(published_at) FROM model_versions GROUP BY task"
            )
            models = {t: (int(n), None if r is None else int(r), at) for t, n, r, at in cur.fetchall()}
        out = []
        for study in sorted(set(exports) | set(refused) | set(spent) | set(models)):
            n_exports, last_export = exports.get(study, (0, None))
            n_models, last_round, last_publish = models.get(study, (0, None, None))
            times = [t for t in (last_export, last_publish) if t is not None]
            out.append(
                StudyActivity(
                    study,
                    n_exports,
                    refused.get(study, []),
                    spent.get(study, 0),
                    n_models,
                    last_round,
                    max(times) if times else None,
                )
            )
        return out
