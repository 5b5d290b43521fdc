"""Round mask keys signed end to end, so the aggregator that relays them cannot substitute one.

Each agent signs its X25519 round public key, bound to the federation id, the task, the round and
its own identity, with the private key of its mutual-TLS certificate, and sends the certificate
along. Every peer checks, before it derives a single mask, that the certificate was issued by the
federation CA, is valid now, names `agent@<peer>`, and that the signature covers exactly that
public key for this federation and round. The aggregator relays (and checks) these, but holds no
agent's private key, so a key it invents or swaps cannot carry a valid signature.

Why the TLS key and not a second signing key: the certificate already binds the key to the
identity the federation CA vouches for, so no new ceremony, file or Secret is needed and a
revoked or expired certificate stops both at once. Reusing the key is safe here because the signed
message carries its own domain-separation prefix and is hashed: no TLS handshake ever signs a
message of that form (TLS 1.3 signs a 64-space prefix and a context string; TLS 1.2 signs the
handshake's random values first). Pure: bytes in, bytes out, no I/O.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from fibemrss.he.errors import HeKeyError
from fibemrss.he.site_certificates import FederationCa, Revoked, SiteKey, signature_valid

_DOMAIN = b"fibemrss-mask-key-signature-v1"


@dataclass(frozen=True)
class SignedMaskKey:
    """A hospital's round public key as relayed by the aggregator: the key, the signature over
    `statement(...)`, and the signer's certificate (DER). Unsigned: both empty (no TLS)."""

    public_key: bytes
    signature: bytes = b""
    certificate: bytes = b""


class MaskKeyRefused(HeKeyError):
    """A relayed mask key that must not be used; the message says why (never a key or secret)."""


def statement(federation_id: bytes, task: str, round_number: int, hospital: str, public_key: bytes) -> bytes:
    """What is signed: SHA-256 of the length-framed fields, behind a domain prefix."""
    digest = hashlib.sha256()
    for part in (_DOMAIN, federation_id, task.encode(), f"agent@{hospital}".encode(), public_key):
        digest.update(len(part).to_bytes(4, "little") + part)
    digest.update(round_number.to_bytes(8, "little", signed=True))
    return _DOMAIN + b"|" + digest.digest()


class MaskKeySigner:
    """Signs this agent's round keys with its mutual-TLS certificate's private key."""

    def __init__(self, certificate_pem: bytes, private_key_pem: bytes) -> None:
        self._site = SiteKey(certificate_pem, private_key_pem, "signing mask keys")
        self.certificate = self._site.certificate
        self.identity = self._site.identity

    def sign(
        self, federation_id: bytes, task: str, round_number: int, hospital: str, public_key: bytes
    ) -> SignedMaskKey:
        if self.identity != f"agent@{hospital}":
            raise HeKeyError(f"the TLS certificate names {self.identity!r}, not agent@{hospital}")
        signature = self._site.sign(statement(federation_id, task, round_number, hospital, public_key))
        return SignedMaskKey(public_key, signature, self.certificate)

    def sign_message(self, message: bytes) -> bytes:
        """Signs any protocol message (each carries its own domain-separation prefix)."""
        return self._site.sign(message)


class MaskKeyVerifier:
    """Checks relayed round keys against the federation CA (the CA file of mutual TLS)."""

    def __init__(self, ca_pem: bytes, revoked: Revoked | None = None) -> None:
        self._ca = FederationCa(ca_pem, revoked)

    def check(
        self,
        federation_id: bytes,
        task: str,
        round_number: int,
        hospital: str,
        key: SignedMaskKey,
        now: datetime.datetime | None = None,
    ) -> None:
        """Raises MaskKeyRefused saying why `key` is not hospital's own key for the round."""
        if not key.signature or not key.certificate:
            raise MaskKeyRefused(f"the mask key of {hospital} is unsigned")
        what = f"the mask key of {hospital}"
        cert = self._ca.check(key.certificate, f"agent@{hospital}", what, MaskKeyRefused, now)
        message = statement(federation_id, task, round_number, hospital, key.public_key)
        try:
            valid = signature_valid(cert, key.signature, message)
        except HeKeyError:
            raise MaskKeyRefused(f"the certificate on {what} has an unsupported key type") from None
        if not valid:
            raise MaskKeyRefused(
                f"the signature on {what} does not cover this key for this federation and round "
                "(substituted or replayed)"
            )

    def check_message(
        self,
        hospital: str,
        message: bytes,
        signature: bytes,
        certificate: bytes,
        now: datetime.datetime | None = None,
    ) -> None:
        """Raises MaskKeyRefused unless `signature` is agent@hospital's over `message` (a protocol
        message of secure aggregation), under a certificate the federation CA issued, valid now."""
        what = f"the message of {hospital}"
        if not signature or not certificate:
            raise MaskKeyRefused(f"{what} is unsigned")
        cert = self._ca.check(certificate, f"agent@{hospital}", what, MaskKeyRefused, now)
        try:
            valid = signature_valid(cert, signature, message)
        except HeKeyError:
            raise MaskKeyRefused(f"the certificate on {what} has an unsupported key type") from None
        if not valid:
            raise MaskKeyRefused(
                f"the signature on {what} does not cover this message for this federation and round "
                "(substituted or replayed)"
            )
