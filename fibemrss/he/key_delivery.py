"""The HE secret key, made at one hospital (the holder) and delivered to another sealed to that
hospital's own key, so no one else (the aggregator that relays it, the CA's operator, a network
observer) can read it.

Sealing is hybrid encryption to the public key of the recipient agent's mutual-TLS certificate
(EC P-256): an ephemeral ECDH key agreement, HKDF-SHA256 and AES-256-GCM, with the associated data
binding the study, the recipient (`agent@<site>` and its key), the sender (`agent@<holder>`) and
the ephemeral key. The envelope is signed with the holder's agent certificate key (ECDSA) and
carries that certificate. Opening checks, before decrypting: the study; that it is addressed to
this hospital's agent and its very key; that the sender's certificate was issued by the
federation CA, is valid now and names `agent@<holder>`; and the signature over the whole envelope.
The sender, in turn, seals only to a certificate of the federation CA naming a hospital's agent,
so a recipient certificate substituted on the way (the aggregator's, or one from another CA) is
refused before anything is encrypted.

Why the TLS keys: as for signed mask keys (`mask_signatures`), the certificates already bind keys
to the identities the federation CA vouches for. The signed message carries its own domain prefix
and is hashed (no TLS handshake signs such a message), and the recipient's key is used for ECDH
only with this module's HKDF domain, so neither use can be turned into the other.

Envelope: MAGIC | u8 version | length-framed fields (u32 little-endian length before each):
study, sender, recipient, recipient key digest, sender certificate (DER), ephemeral public key
(X9.62 uncompressed), nonce, ciphertext, signature. Pure: bytes in, bytes out, no I/O.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
from dataclasses import dataclass, fields, replace

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fibemrss.he.errors import HeKeyError
from fibemrss.he.keys import load_hospital_key
from fibemrss.he.site_certificates import (
    FederationCa,
    Revoked,
    SiteKey,
    common_name,
    public_key_sha256,
    signature_valid,
)

SEALED_MAGIC = b"FIBEMRSS-SEALED-HE-KEY\n"
SEALED_FORMAT_VERSION = 1
_DOMAIN = b"fibemrss-sealed-he-key-v1"
_U32 = struct.Struct("<I")
_NONCE_BYTES = 12
_MAX_FIELD_BYTES = 16 * 1024 * 1024  # an HE key of the default parameters is about 0.2 MB


class KeyDeliveryRefused(HeKeyError):
    """A sealed HE key that must not be opened or sealed; the message says why (never a secret)."""


@dataclass(frozen=True)
class SealedKey:
    """A parsed envelope; `signature` covers every other field."""

    study: str
    sender: str
    recipient: str
    recipient_key: bytes
    sender_certificate: bytes
    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes
    signature: bytes = b""

    def signed_part(self) -> bytes:
        """What the sender signs: a domain prefix and the SHA-256 of every field but the signature."""
        digest = hashlib.sha256(_frame(_DOMAIN, *self._field_bytes()[:-1]))
        return _DOMAIN + b"|" + digest.digest()

    def associated_data(self) -> bytes:
        """What AES-GCM authenticates beside the ciphertext: who, to whom, for which study."""
        return _frame(
            _DOMAIN,
            self.study.encode(),
            self.sender.encode(),
            self.recipient.encode(),
            self.recipient_key,
            self.ephemeral_public_key,
        )

    def to_bytes(self) -> bytes:
        return SEALED_MAGIC + bytes([SEALED_FORMAT_VERSION]) + _frame(*self._field_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedKey:
        if not data.startswith(SEALED_MAGIC):
            raise KeyDeliveryRefused("not a sealed FIBEMRSS HE key (bad magic); make one with `keys seal`")
        offset = len(SEALED_MAGIC)
        if len(data) <= offset or data[offset] != SEALED_FORMAT_VERSION:
            raise KeyDeliveryRefused(
                f"sealed HE key format version is not supported (expected {SEALED_FORMAT_VERSION})"
            )
        offset += 1
        parts: list[bytes] = []
        for _ in fields(cls):
            if offset + _U32.size > len(data):
                raise KeyDeliveryRefused("the sealed HE key is truncated")
            (length,) = _U32.unpack_from(data, offset)
            offset += _U32.size
            if length > _MAX_FIELD_BYTES or offset + length > len(data):
                raise KeyDeliveryRefused("the sealed HE key is truncated or corrupt")
            parts.append(data[offset : offset + length])
            offset += length
        if offset != len(data):
            raise KeyDeliveryRefused("the sealed HE key has trailing bytes")
        try:
            study, sender, recipient = (p.decode() for p in parts[:3])
        except UnicodeDecodeError:
            raise KeyDeliveryRefused(
                "the sealed HE key names its study or parties in invalid UTF-8"
            ) from None
        return cls(study, sender, recipient, *parts[3:])

    def _field_bytes(self) -> list[bytes]:
        return [
            self.study.encode(),
            self.sender.encode(),
            self.recipient.encode(),
            self.recipient_key,
            self.sender_certificate,
            self.ephemeral_public_key,
            self.nonce,
            self.ciphertext,
            self.signature,
        ]


def seal_hospital_key(
    hospital_key: bytes,
    *,
    study: str,
    recipient_certificate_pem: bytes,
    ca_pem: bytes,
    signer_certificate_pem: bytes,
    signer_key_pem: bytes,
    now: datetime.datetime | None = None,
    revoked: Revoked | None = None,
) -> bytes:
    """At the holder: `hospital_key` (the bytes of hospital.he) sealed to the agent of the
    hospital whose certificate is given, signed with the holder agent's own certificate key."""
    _check_study(study)
    load_hospital_key(hospital_key)  # refuses aggregator.he or a corrupt file before sealing it
    ca = FederationCa(ca_pem, revoked)
    signer = SiteKey(signer_certificate_pem, signer_key_pem, "sealing the HE key")
    _check_agent(signer.identity, "the signer's certificate")
    ca.check(signer.certificate, signer.identity, "the signer's certificate", KeyDeliveryRefused, now)
    try:
        recipient_cert = x509.load_pem_x509_certificate(recipient_certificate_pem)
    except ValueError as error:
        raise KeyDeliveryRefused(f"unreadable recipient certificate: {error}") from None
    recipient = common_name(recipient_cert)
    _check_agent(recipient, "the recipient certificate")
    ca.check(
        recipient_cert.public_bytes(serialization.Encoding.DER),
        recipient,
        "the recipient certificate",
        KeyDeliveryRefused,
        now,
    )
    recipient_public = recipient_cert.public_key()
    if not isinstance(recipient_public, ec.EllipticCurvePublicKey) or not isinstance(
        recipient_public.curve, ec.SECP256R1
    ):
        raise KeyDeliveryRefused(
            f"the recipient certificate of {recipient} carries no EC P-256 key (as `certs request` makes)"
        )
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    envelope = SealedKey(
        study=study,
        sender=signer.identity,
        recipient=recipient,
        recipient_key=public_key_sha256(recipient_cert.public_key()),
        sender_certificate=signer.certificate,
        ephemeral_public_key=ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        ),
        nonce=os.urandom(_NONCE_BYTES),
        ciphertext=b"",
    )
    aead = AESGCM(_derive_key(ephemeral.exchange(ec.ECDH(), recipient_public), envelope))
    envelope = replace(
        envelope, ciphertext=aead.encrypt(envelope.nonce, hospital_key, envelope.associated_data())
    )
    return replace(envelope, signature=signer.sign(envelope.signed_part())).to_bytes()


def open_hospital_key(
    sealed: bytes,
    *,
    study: str,
    holder: str,
    ca_pem: bytes,
    certificate_pem: bytes,
    private_key_pem: bytes,
    now: datetime.datetime | None = None,
    revoked: Revoked | None = None,
) -> bytes:
    """At a recipient hospital: the bytes of hospital.he out of `sealed`, with this hospital's
    agent certificate and key, if it was sealed for `study` by `agent@<holder>` under the
    federation CA and to this very key; else KeyDeliveryRefused saying what is wrong."""
    _check_study(study)
    envelope = SealedKey.from_bytes(bytes(sealed))
    own = SiteKey(certificate_pem, private_key_pem, "opening the HE key")
    _check_agent(own.identity, "this hospital's certificate")
    if envelope.study != study:
        raise KeyDeliveryRefused(f"the HE key was sealed for study {envelope.study!r}, not {study!r}")
    if envelope.recipient != own.identity:
        raise KeyDeliveryRefused(
            f"the HE key is addressed to {envelope.recipient}, not to this hospital ({own.identity})"
        )
    if envelope.recipient_key != public_key_sha256(own.cert.public_key()):
        raise KeyDeliveryRefused(
            f"the HE key is sealed to another key of {own.identity} than this certificate's "
            "(an older certificate, or re-addressed)"
        )
    expected_sender = f"agent@{holder}"
    if envelope.sender != expected_sender:
        raise KeyDeliveryRefused(
            f"the HE key was sealed by {envelope.sender}, but the study's key holder is {expected_sender}"
        )
    what = "the sealed HE key"
    sender_cert = FederationCa(ca_pem, revoked).check(
        envelope.sender_certificate, expected_sender, what, KeyDeliveryRefused, now
    )
    if not signature_valid(sender_cert, envelope.signature, envelope.signed_part()):
        raise KeyDeliveryRefused(
            f"the signature of {expected_sender} on {what} does not cover its content (tampered with "
            "or re-addressed)"
        )
    private = own.private_key
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise KeyDeliveryRefused(f"this hospital's key is not an EC key, so {what} cannot be for it")
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), envelope.ephemeral_public_key
        )
        secret = private.exchange(ec.ECDH(), ephemeral)
        plain = AESGCM(_derive_key(secret, envelope)).decrypt(
            envelope.nonce, envelope.ciphertext, envelope.associated_data()
        )
    except (ValueError, InvalidTag):
        raise KeyDeliveryRefused(
            f"{what} does not decrypt with this hospital's key (tampered with, or sealed wrongly)"
        ) from None
    try:
        load_hospital_key(plain)
    except HeKeyError as error:
        raise KeyDeliveryRefused(f"{what} holds no usable hospital HE key: {error}") from None
    return plain


def _derive_key(shared_secret: bytes, envelope: SealedKey) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=envelope.associated_data()).derive(
        shared_secret
    )


def _check_agent(identity: str, what: str) -> None:
    role, at, site = identity.partition("@")
    if role != "agent" or not at or not site or site == "central":
        raise KeyDeliveryRefused(
            f"{what} names {identity!r}: the HE key goes only from and to a hospital's agent"
        )


def _check_study(study: str) -> None:
    if not study or not study.isprintable():
        raise KeyDeliveryRefused(f"study {study!r}: a sealed HE key is bound to a study's name")


def _frame(*parts: bytes) -> bytes:
    return b"".join(_U32.pack(len(p)) + p for p in parts)
