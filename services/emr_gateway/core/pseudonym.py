"""Pseudonymous patient keys: a keyed hash of the source identifier, with a per-hospital key."""

from __future__ import annotations

import hashlib
import hmac


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key

    def patient_key(self, source_system: str, source_patient_id: str) -> str:
        # The source system is part of the input: identifiers are only unique within one system.
        message = f"{source_system}\x1f{source_patient_id}".encode()
        return "pk_" + hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]
