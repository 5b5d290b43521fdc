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
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from fibemrss.he.errors import HeKeyError

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
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem)
            key = serialization.load_pem_private_key(private_key_pem, password=None)
        except ValueError as error:
            raise HeKeyError(f"unreadable TLS certificate or key for signing mask keys: {error}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
            raise HeKeyError(f"a {type(key).__name__} cannot sign mask keys (EC, Ed25519 or RSA)")
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise HeKeyError("the TLS private key does not belong to the TLS certificate")
        self._key = key
        self.certificate = cert.public_bytes(serialization.Encoding.DER)
        self.identity = _common_name(cert)

    def sign(
        self, federation_id: bytes, task: str, round_number: int, hospital: str, public_key: bytes
    ) -> SignedMaskKey:
        if self.identity != f"agent@{hospital}":
            raise HeKeyError(f"the TLS certificate names {self.identity!r}, not agent@{hospital}")
        message = statement(federation_id, task, round_number, hospital, public_key)
        return SignedMaskKey(public_key, self.sign_message(message), self.certificate)

    def sign_message(self, message: bytes) -> bytes:
        """Signs any protocol message (each carries its own domain-separation prefix)."""
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(message, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(message)
        return key.sign(message, _PSS, hashes.SHA256())


class MaskKeyVerifier:
    """Checks relayed round keys against the federation CA (the CA file of mutual TLS)."""

    def __init__(self, ca_pem: bytes) -> None:
        try:
            self._cas = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as error:
            raise HeKeyError(f"unreadable federation CA: {error}") from None

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
        message = statement(federation_id, task, round_number, hospital, key.public_key)
        try:
            self.check_message(hospital, message, key.signature, key.certificate, now)
        except MaskKeyRefused as refused:
            raise MaskKeyRefused(
                str(refused).replace("the message", "the mask key").replace("this message", "this key")
            ) from None

    def check_message(
        self,
        hospital: str,
        message: bytes,
        signature: bytes,
        certificate: bytes,
        now: datetime.datetime | None = None,
    ) -> None:
        """Raises MaskKeyRefused unless `signature` is agent@hospital's over `message`, under a
        certificate the federation CA issued and that is valid now."""
        if not signature or not certificate:
            raise MaskKeyRefused(f"the message of {hospital} is unsigned")
        try:
            with warnings.catch_warnings():  # a malformed certificate is refused below, not warned about
                warnings.simplefilter("ignore")
                cert = x509.load_der_x509_certificate(certificate)
        except (ValueError, x509.InvalidVersion):
            raise MaskKeyRefused(f"the message of {hospital} carries an unreadable certificate") from None
        if not any(_issued_by(cert, ca) for ca in self._cas):
            raise MaskKeyRefused(
                f"the certificate on the message of {hospital} is not issued by the federation CA"
            )
        moment = now or datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise MaskKeyRefused(f"the certificate on the message of {hospital} is not valid now")
        identity = _common_name(cert)
        if identity != f"agent@{hospital}":
            raise MaskKeyRefused(f"the message of {hospital} is signed by {identity!r}, not agent@{hospital}")
        public = cert.public_key()
        try:
            if isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            elif isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(signature, message)
            elif isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, message, _PSS, hashes.SHA256())
            else:
                raise MaskKeyRefused(
                    f"the certificate on the message of {hospital} has an unsupported key type"
                )
        except InvalidSignature:
            raise MaskKeyRefused(
                f"the signature on the message of {hospital} does not cover this message for this "
                "federation and round (substituted or replayed)"
            ) from None


_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")
