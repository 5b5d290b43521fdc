"""A hospital's privacy ledger (PostgreSQL): spends per dataset, budgets, each one audited.
Composition rules: fibemrss.domain.privacy."""

from __future__ import annotations

from typing import Any

from fibemrss.db.pool import Database
from fibemrss.domain.privacy import Budget, PrivacySpend


class PrivacyLedger:
    def __init__(self, db: Database) -> None:
        self._db = db

    def budget(self, dataset: str) -> Budget | None:
        with self._db.transaction() as cur:
            cur.execute("SELECT epsilon, delta FROM privacy_budgets WHERE dataset=%s", (dataset,))
            row = cur.fetchone()
        return None if row is None else Budget(float(row[0]), float(row[1]))

    def set_budget(self, dataset: str, epsilon: float, delta: float, actor: str) -> None:
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO privacy_budgets (dataset, epsilon, delta, set_by) VALUES (%s,%s,%s,%s) "
                "ON CONFLICT (dataset) DO UPDATE SET epsilon=EXCLUDED.epsilon, delta=EXCLUDED.delta, "
                "set_by=EXCLUDED.set_by, set_at=now()",
                (dataset, epsilon, delta, actor),
            )
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,'set_privacy_budget',%s,%s)",
                (actor, f"epsilon={epsilon:g} delta={delta:g}", dataset),
            )

    def latest(self, dataset: str) -> list[PrivacySpend]:
        """The latest (cumulative) spend of each (federation, kind) on the dataset."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT DISTINCT ON (federation_id, kind) dataset, task, federation_id, kind, round, rounds, "
                "epsilon, delta FROM privacy_ledger WHERE dataset=%s ORDER BY federation_id, kind, id DESC",
                (dataset,),
            )
            return [
                PrivacySpend(d, t, bytes(f), k, int(r), int(n), float(e), float(dl))
                for d, t, f, k, r, n, e, dl in cur.fetchall()
            ]

    def record(self, spend: PrivacySpend, actor: str) -> None:
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO privacy_ledger (dataset, task, federation_id, kind, round, rounds, epsilon, delta) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                (
                    spend.dataset,
                    spend.task,
                    spend.federation_id,
                    spend.kind,
                    spend.round,
                    spend.rounds,
                    spend.epsilon,
                    spend.delta,
                ),
            )
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,'privacy_spend',%s,%s)",
                (
                    actor,
                    f"{spend.kind} round {spend.round}: epsilon {spend.epsilon:.4g} delta {spend.delta:g} "
                    f"(cumulative in federation {spend.federation_id.hex()})",
                    f"{spend.dataset}/{spend.task}",
                ),
            )

    def entries(self, dataset: str | None = None) -> list[dict[str, Any]]:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT dataset, task, federation_id, kind, round, rounds, epsilon, delta, recorded_at "
                "FROM privacy_ledger WHERE %s::text IS NULL OR dataset=%s ORDER BY id",
                (dataset, dataset),
            )
            return [
                {
                    "dataset": d,
                    "task": t,
                    "federation_id": bytes(f).hex(),
                    "kind": k,
                    "round": r,
                    "rounds": n,
                    "epsilon": e,
                    "delta": dl,
                    "recorded_at": at.isoformat(),
                }
                for d, t, f, k, r, n, e, dl, at in cur.fetchall()
            ]

    def datasets(self) -> list[str]:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT dataset FROM privacy_budgets UNION SELECT dataset FROM privacy_ledger ORDER BY 1"
            )
            return [r[0] for r in cur.fetchall()]
