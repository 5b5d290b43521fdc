"""The hospital's model store (PostgreSQL): published model versions, each publication audited."""

from __future__ import annotations

import json

from fibemrss.db.pool import Database, one_row
from fibemrss.domain.errors import FailedPrecondition, NotFound
from fibemrss.domain.published_model import ModelVersion, PublishedModel


class ModelStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def publish(self, mv: ModelVersion, actor: str, choice: str = "") -> bool:
        """Stores a version once; False if that version already exists (a restarted agent).

        `choice` (a personalized version) says which model the hospital serves and why; it is
        audited in the same transaction as the publication."""
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO model_versions (task, version, federated_round, model_json, metrics, "
                "kind, base_version, standby) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING RETURNING version",
                (
                    mv.task,
                    mv.version,
                    mv.federated_round,
                    json.dumps(mv.model.to_json()),
                    json.dumps(mv.metrics),
                    mv.kind,
                    mv.base_version,
                    mv.standby,
                ),
            )
            if cur.fetchone() is None:
                return False
            purpose = "federated round closed" if mv.kind == "global" else "personalized after the last round"
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,'publish_model',%s,%s)",
                (actor, purpose, f"{mv.task}@{mv.version}"),
            )
            if choice:
                cur.execute(
                    "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,'choose_model',%s,%s)",
                    (actor, choice, f"{mv.task}@{mv.version}"),
                )
            return True

    def servable_versions(self, task: str) -> list[int]:
        """Published, not retired versions, the one to serve first: newest first, standby
        versions after every other one."""
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT version FROM model_versions WHERE task=%s AND retired_at IS NULL "
                "ORDER BY standby, version DESC",
                (task,),
            )
            return [int(r[0]) for r in cur.fetchall()]

    def latest_version(self, task: str) -> int | None:
        """The servable version served by default (retiring it rolls back to the previous)."""
        versions = self.servable_versions(task)
        return versions[0] if versions else None

    def get(self, task: str, version: int | None = None) -> ModelVersion:
        """A servable version (the one served by default when `version` is None); NotFound if
        absent or retired."""
        columns = "version, federated_round, model_json, metrics, retired_at, kind, base_version, standby"
        with self._db.transaction() as cur:
            if version is None:
                cur.execute(
                    f"SELECT {columns} FROM model_versions "  # noqa: S608 - constant column list
                    "WHERE task=%s AND retired_at IS NULL ORDER BY standby, version DESC LIMIT 1",
                    (task,),
                )
            else:
                cur.execute(
                    f"SELECT {columns} FROM model_versions WHERE task=%s AND version=%s",  # noqa: S608
                    (task, version),
                )
            row = cur.fetchone()
        if row is None:
            which = "any version" if version is None else f"version {version}"
            raise NotFound(f"no published model for task {task!r} ({which})")
        if row[4] is not None:
            raise NotFound(f"version {version} of {task!r} is retired")
        return ModelVersion(
            task,
            int(row[0]),
            int(row[1]),
            PublishedModel.from_json(row[2]),
            row[3],
            kind="personalized" if row[5] == "personalized" else "global",
            base_version=None if row[6] is None else int(row[6]),
            standby=bool(row[7]),
        )

    def retire(self, task: str, version: int, actor: str, reason: str) -> None:
        """Stops serving a version, audited. The last servable version cannot be retired."""
        with self._db.transaction() as cur:
            # Serialize retirements, so two of them cannot together retire every version.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"retire:{task}",))
            cur.execute(
                "SELECT retired_at FROM model_versions WHERE task=%s AND version=%s FOR UPDATE",
                (task, version),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no published model for task {task!r} (version {version})")
            if row[0] is not None:
                return  # already retired: a repeat changes nothing
            cur.execute("SELECT count(*) FROM model_versions WHERE task=%s AND retired_at IS NULL", (task,))
            if one_row(cur)[0] <= 1:
                raise FailedPrecondition(f"version {version} is the only servable version of {task!r}")
            cur.execute(
                "UPDATE model_versions SET retired_at=now(), retired_by=%s, retire_reason=%s "
                "WHERE task=%s AND version=%s",
                (actor, reason, task, version),
            )
            cur.execute(
                "INSERT INTO audit_log (actor, action, purpose, subject) VALUES (%s,'retire_model',%s,%s)",
                (actor, reason, f"{task}@{version}"),
            )
