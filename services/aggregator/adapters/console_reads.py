"""The federation console's store (PostgreSQL): federations and rounds as the aggregator's store
reads them, the proposals listed, and the console's audit rows."""

from __future__ import annotations

from fibemrss.db.pool import Database
from services.aggregator.adapters.store import AggregatorStore
from services.aggregator.core.proposals import Proposal
from services.aggregator.core.round_state import FederationSettings, Round


class FederationConsoleReads:
    def __init__(self, db: Database, store: AggregatorStore) -> None:
        self._db = db
        self._store = store

    def tasks(self) -> list[str]:
        return self._store.tasks()

    def settings(self, task: str) -> FederationSettings:
        return self._store.settings(task)

    def rounds(self, task: str) -> list[Round]:
        return self._store.rounds(task)

    def failure(self, task: str, number: int) -> str:
        return self._store.failure(task, number)

    def proposals(self) -> list[Proposal]:
        """Every proposed document, newest first."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT study, study_hash, version, document, proposed_by, proposed_at FROM study_proposals "
                "ORDER BY proposed_at DESC, study"
            )
            return [Proposal(s, h, int(v), bytes(d), by, at) for s, h, v, d, by, at in cur.fetchall()]

    def audit(self, actor: str, action: str, subject: str = "") -> None:
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO audit_log (actor, action, subject) VALUES (%s,%s,%s)", (actor, action, subject)
            )
