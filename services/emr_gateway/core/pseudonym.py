"""Keyed hashes of source identifiers, with a per-hospital key (pure).

Nothing a source system identifies its records by is kept in clear: patient identifiers (HL7 PID-3
MRNs, FHIR `identifier.value` or Patient ids, CSV ids) become pseudonymous patient keys, and every
other source identifier (a record's source id, FHIR resource ids, HL7 control ids and visit
numbers, CSV row ids, Consent ids) becomes a source-id hash. Both are HMAC-SHA256; the source-id
hash uses a key derived from the pseudonym key under its own label, so the two kinds of hash never
coincide and neither key can be recovered from the other's outputs. The hashes are deterministic:
idempotency (source system + hashed source id + payload hash) holds across re-sends and restarts.
"""

from __future__ import annotations

import hashlib
import hmac

# The label of the key that hashes source ids (HMAC of the label under the pseudonym key).
SOURCE_ID_KEY_LABEL = b"fibemrss source-id v1"
SOURCE_ID_PREFIX = "sid_"


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key
        self._source_key = hmac.new(key, SOURCE_ID_KEY_LABEL, hashlib.sha256).digest()

    def patient_key(self, source_system: str, source_patient_id: str) -> str:
        # The source system is part of the input: identifiers are only unique within one system.
        message = f"{source_system}\x1f{source_patient_id}".encode()
        return "pk_" + hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

    def source_id(self, source_system: str, source_id: str) -> str:
        """The keyed hash kept at rest in place of a source identifier; "" stays "" (no id)."""
        if not source_id:
            return ""
        message = f"{source_system}\x1f{source_id}".encode("utf-8", "surrogatepass")
        return SOURCE_ID_PREFIX + hmac.new(self._source_key, message, hashlib.sha256).hexdigest()[:32]
