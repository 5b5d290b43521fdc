"""The hospital's model store (PostgreSQL): published model versions, each publication audited."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fibemrss.db.pool import Database
from fibemrss.errors import NotFound


@dataclass(frozen=True)
class ModelVersion:
    task: str
    version: int
    federated_round: int
    model: dict[str, Any]  # model name, input names, shapes, flat params, global feature statistics
    metrics: dict[str, Any]


class ModelStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def publish(self, mv: ModelVersion, actor: str) -> bool:
        """Stores a version once; False if that version already exists (a restarted agent)."""
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO model_versions (task, version, federated_round, model_json, metrics) "
                "VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING version",
                (mv.task, mv.version, mv.federated_round, json.dumps(mv.model), json.dumps(mv.metrics)),
            )
            if cur.fetchone() is None:
                return False
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,'publish_model',%s,%s)",
                (actor, "federated round closed", f"{mv.task}@{mv.version}"),
            )
            return True

    def latest_version(self, task: str) -> int | None:
        with self._db.transaction() as cur:
            cur.execute("SELECT max(version) FROM model_versions WHERE task=%s", (task,))
            row = cur.fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def get(self, task: str, version: int | None = None) -> ModelVersion:
        with self._db.transaction() as cur:
            if version is None:
                cur.execute(
                    "SELECT version, federated_round, model_json, metrics FROM model_versions WHERE task=%s "
                    "ORDER BY version DESC LIMIT 1",
                    (task,),
                )
            else:
                cur.execute(
                    "SELECT version, federated_round, model_json, metrics FROM model_versions "
                    "WHERE task=%s AND version=%s",
                    (task, version),
                )
            row = cur.fetchone()
        if row is None:
            which = "any version" if version is None else f"version {version}"
            raise NotFound(f"no published model for task {task!r} ({which})")
        return ModelVersion(task, int(row[0]), int(row[1]), row[2], row[3])
