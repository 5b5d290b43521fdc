"""The key the agent's secrets are sealed under at rest (docs/security.md, "Secrets at rest").

The agent keeps 32-byte secrets in the hospital's database (its pairwise-masking seed, its
dataset-size noise seed: `local_secrets.py`); anyone who reads that table could unmask its
updates, so each row is sealed with AES-256-GCM under a key that is not in the database: a file
today (`FIBEMRSS_AGENT_SECRETS_KEY_FILE`, a Kubernetes Secret mounted as a file in the chart).
`SecretsKey` is the port: a KMS plugs in as another adapter whose `seal`/`open` call the KMS (or
unwrap a data key with it), under its own `key_id`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fibemrss.domain.errors import ConfigError

KEY_FILE_VARIABLE = "FIBEMRSS_AGENT_SECRETS_KEY_FILE"
_NONCE_BYTES = 12


class SecretsKeyError(ConfigError):
    """A sealed secret that this key cannot open: another key, or a row altered at rest. The
    agent refuses to start (or to go on) rather than make new secrets in its place."""


class SecretsKey(Protocol):
    @property
    def key_id(self) -> str:
        """Names the key (never reveals it), stored beside each row it sealed: a row sealed under
        another key is refused by name rather than by a failed decryption."""
        ...

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypts and authenticates `plaintext`, bound to `associated_data` (the row's identity)."""
        ...

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        """The plaintext of `sealed`; SecretsKeyError if it fails authentication."""
        ...


class FileSecretsKey:
    """AES-256-GCM under a 32-byte key; a fresh random 96-bit nonce per seal, stored in front of
    the ciphertext (nonce || ciphertext || tag)."""

    def __init__(self, key: bytes, source: str = KEY_FILE_VARIABLE) -> None:
        if len(key) != 32:
            raise ConfigError(f"{source}: an AES-256 key is 32 bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._source = source
        # A hash of the key under a label of its own: names it, reveals nothing of it.
        self._key_id = "file:" + hashlib.sha256(b"fibemrss agent secrets key id|" + key).hexdigest()[:16]

    @property
    def key_id(self) -> str:
        return self._key_id

    @classmethod
    def from_file(cls, path: str, variable: str = KEY_FILE_VARIABLE) -> FileSecretsKey:
        """The key in `path`: 32 raw bytes, or their base64 (`openssl rand -base64 32`) or hex."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
        return cls(_parse_key(data, variable), variable)

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated_data)
        except (InvalidTag, ValueError):
            raise SecretsKeyError(
                f"a sealed agent secret fails authentication under the key of {self._source} "
                f"({self._key_id}): the row was altered or moved at rest"
            ) from None


def _parse_key(data: bytes, variable: str) -> bytes:
    if len(data) == 32:
        return data
    text = data.strip()
    for decode in (binascii.unhexlify, lambda t: base64.b64decode(t, validate=True)):
        try:
            key = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(key) == 32:
            return key
    raise ConfigError(
        f"{variable} must name a file holding 32 random bytes, raw, base64 (openssl rand -base64 32) "
        f"or hex; this one holds {len(data)} bytes that are none of these"
    )
