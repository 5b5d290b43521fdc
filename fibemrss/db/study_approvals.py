"""A hospital's site policy and its study decisions (PostgreSQL), each change audited.

Rules of what may be approved: fibemrss.domain.site_policy. A decision is pinned by the study's
hash; the latest decision for a (study, hash) is the one that counts, and a document of the same
name with another hash has no decision until it is reviewed.
"""

from __future__ import annotations

import json
from typing import Any

from fibemrss.db.pool import Database
from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.site_policy import (
    DEFAULT_POLICY,
    SitePolicy,
    StudyDecision,
    parse_site_policy,
    policy_to_json,
)
from fibemrss.domain.study import parse_study, study_hash, study_to_json
from fibemrss.domain.task_spec import TaskSpec


class StudyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- the site policy -----------------------------------------------------------------------------
    def site_policy(self) -> tuple[SitePolicy, bool]:
        """The hospital's policy, and whether it was set (False: the default policy applies)."""
        with self._db.transaction() as cur:
            cur.execute("SELECT document FROM site_policy WHERE id=1")
            row = cur.fetchone()
        if row is None:
            return DEFAULT_POLICY, False
        return parse_site_policy(row[0], "site_policy"), True

    def set_site_policy(self, policy: SitePolicy, actor: str) -> bool:
        """Stores the policy; False (and nothing audited) when it is already the one in force."""
        document = json.dumps(policy_to_json(policy), sort_keys=True)
        with self._db.transaction() as cur:
            cur.execute("SELECT document FROM site_policy WHERE id=1 FOR UPDATE")
            row = cur.fetchone()
            if row is not None and row[0] == document:
                return False
            cur.execute(
                "INSERT INTO site_policy (id, document, set_by) VALUES (1,%s,%s) ON CONFLICT (id) DO UPDATE "
                "SET document=EXCLUDED.document, set_by=EXCLUDED.set_by, set_at=now()",
                (document, actor),
            )
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,'set_site_policy',%s,'')",
                (actor, document[:2000]),
            )
        return True

    # -- decisions -------------------------------------------------------------------------------------
    def record_decision(
        self, task: TaskSpec, decision: str, reason: str, eligible: int | None, actor: str
    ) -> StudyDecision:
        if decision not in ("approved", "refused"):
            raise ValueError(f"unknown decision {decision!r}")
        digest = study_hash(task)
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO study_decisions (study, study_hash, version, decision, reason, eligible, document, "
                "decided_by) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                (
                    task.name,
                    digest,
                    task.version,
                    decision,
                    reason,
                    eligible,
                    json.dumps(study_to_json(task)),
                    actor,
                ),
            )
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,%s,%s,%s)",
                (actor, f"study_{decision}", reason or decision, f"{task.name} {digest}"),
            )
        latest = self.latest_decision(task.name, digest)
        assert latest is not None
        return latest

    def latest_decision(self, study: str, digest: str) -> StudyDecision | None:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT study, study_hash, version, decision, reason, eligible, decided_by, decided_at "
                "FROM study_decisions WHERE study=%s AND study_hash=%s ORDER BY id DESC LIMIT 1",
                (study, digest),
            )
            row = cur.fetchone()
        return None if row is None else _decision(row)

    def decisions(self) -> list[StudyDecision]:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT study, study_hash, version, decision, reason, eligible, decided_by, decided_at "
                "FROM study_decisions ORDER BY id"
            )
            return [_decision(r) for r in cur.fetchall()]

    def approved_studies(self) -> list[TaskSpec]:
        """The studies this hospital takes part in now: for each study name, the document of its
        most recent decision, when that decision (the latest on its hash) is an approval. A later
        refusal of the same hash (a withdrawn approval) retires it; an approval of a newer version
        replaces the older one."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT DISTINCT ON (study) study, decision, document FROM ("
                " SELECT DISTINCT ON (study, study_hash) id, study, decision, document FROM study_decisions"
                " ORDER BY study, study_hash, id DESC) latest ORDER BY study, id DESC"
            )
            rows = cur.fetchall()
        out = []
        for name, decision, document in rows:
            if decision != "approved":
                continue
            try:
                out.append(parse_study(document, f"study_decisions ({name})"))
            except InvalidArgument:
                # Approved by an older build whose schema this one no longer reads: not joined.
                continue
        return out


def _decision(row: tuple[Any, ...]) -> StudyDecision:
    s, h, v, d, r, e, by, at = row
    return StudyDecision(s, h, int(v), d, r, None if e is None else int(e), by, at.isoformat())
