"""The agent's secrets in the hospital's own database (adapter of `ports.SecretPort`), sealed at
rest under a key from outside the database (`secrets_key.py`; docs/security.md, "Secrets at
rest").

Each row is stored as `SecretsKey.seal(secret, row identity)` with the key's id beside it, so a
sealed value copied onto another row, or a row sealed under another key, is refused, never taken
for a secret. Rows written in clear (before migration 0030, or by an agent on loopback without a
key) have no key id; `seal_clear_rows` seals them at the agent's start, as the gateway rehashes
its source identifiers.
"""

from __future__ import annotations

import logging
import os

from fibemrss.db.pool import Database, one_row
from services.hospital_agent.adapters.secrets_key import KEY_FILE_VARIABLE, SecretsKey, SecretsKeyError

log = logging.getLogger(__name__)


def associated_data(name: str, key_id: str) -> bytes:
    """What a sealed row is bound to: its name (the row's identity) and the key's id."""
    return b"fibemrss agent_secrets\x00" + name.encode() + b"\x00" + key_id.encode()


class LocalSecretStore:
    def __init__(self, db: Database, key: SecretsKey | None = None) -> None:
        """`key` None stores new secrets in clear: only for an agent on loopback (its __main__
        refuses that elsewhere), and it cannot read a row that was sealed."""
        self._db = db
        self._key = key

    def secret(self, name: str) -> bytes:
        """The 32-byte secret called `name`, created at random on first use (concurrent first
        uses agree on one: the first insert wins)."""
        fresh = os.urandom(32)
        key_id = None if self._key is None else self._key.key_id
        stored = (
            fresh if self._key is None else self._key.seal(fresh, associated_data(name, self._key.key_id))
        )
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO agent_secrets (name, secret, key_id) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, stored, key_id),
            )
            cur.execute("SELECT secret, key_id FROM agent_secrets WHERE name=%s", (name,))
            secret, row_key = one_row(cur)
        return self._open(name, bytes(secret), row_key)

    def _open(self, name: str, stored: bytes, row_key: str | None) -> bytes:
        if row_key is None:
            return stored  # written in clear; sealed at the next start with a key
        if self._key is None:
            raise SecretsKeyError(
                f"agent secret {name!r} is sealed under key {row_key} but {KEY_FILE_VARIABLE} is not set"
            )
        if row_key != self._key.key_id:
            raise SecretsKeyError(
                f"agent secret {name!r} is sealed under key {row_key} but {KEY_FILE_VARIABLE} holds key "
                f"{self._key.key_id}: give the agent the key it sealed its secrets with"
            )
        secret = self._key.open(stored, associated_data(name, row_key))
        if len(secret) != 32:
            raise SecretsKeyError(f"agent secret {name!r} opens to {len(secret)} bytes, not 32")
        return secret

    def seal_clear_rows(self) -> int:
        """Seals every row stored in clear under the key; returns how many. Nothing without a key."""
        if self._key is None:
            return 0
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT name, secret FROM agent_secrets WHERE key_id IS NULL ORDER BY name FOR UPDATE"
            )
            rows = cur.fetchall()
            for name, secret in rows:
                cur.execute(
                    "UPDATE agent_secrets SET secret=%s, key_id=%s WHERE name=%s",
                    (
                        self._key.seal(bytes(secret), associated_data(name, self._key.key_id)),
                        self._key.key_id,
                        name,
                    ),
                )
        if rows:
            log.info("agent secrets sealed at rest", extra={"rows": len(rows), "key_id": self._key.key_id})
        return len(rows)

    def check(self) -> int:
        """Opens every stored secret (a handful of rows), so a wrong or missing key stops the agent
        at start-up with an error naming it, not in the middle of a round; returns how many."""
        with self._db.transaction() as cur:
            cur.execute("SELECT name, secret, key_id FROM agent_secrets ORDER BY name")
            rows = cur.fetchall()
        for name, stored, row_key in rows:
            self._open(name, bytes(stored), row_key)
        return len(rows)
