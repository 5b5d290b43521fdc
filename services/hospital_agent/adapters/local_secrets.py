"""The agent's secrets in the hospital's own database (adapter of `ports.SecretPort`)."""

from __future__ import annotations

import os

from fibemrss.db.pool import Database, one_row


class LocalSecretStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def secret(self, name: str) -> bytes:
        """The 32-byte secret called `name`, created at random on first use (concurrent first
        uses agree on one: the first insert wins)."""
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO agent_secrets (name, secret) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, os.urandom(32)),
            )
            cur.execute("SELECT secret FROM agent_secrets WHERE name=%s", (name,))
            (secret,) = one_row(cur)
        return bytes(secret)
