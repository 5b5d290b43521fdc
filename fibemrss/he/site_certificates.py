"""A site's mutual-TLS certificate as the key that speaks for it, checked against the federation CA.

Signed mask keys (`mask_signatures`) and sealed HE keys (`key_delivery`) both rest on it: a site
signs with the private key of its own certificate, and a peer believes the signature only under a
certificate that the federation CA issued, that is valid now and that names the identity expected.
Pure: bytes in, bytes out, no I/O.
"""

from __future__ import annotations

import datetime
import hashlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from fibemrss.he.errors import HeKeyError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class SiteKey:
    """A site's certificate and its private key, checked to belong together."""

    def __init__(self, certificate_pem: bytes, private_key_pem: bytes, purpose: str) -> None:
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem)
            key = serialization.load_pem_private_key(private_key_pem, password=None)
        except ValueError as error:
            raise HeKeyError(f"unreadable TLS certificate or key for {purpose}: {error}") from None
        if not isinstance(key, PrivateKey):
            raise HeKeyError(f"a {type(key).__name__} cannot be used for {purpose} (EC, Ed25519 or RSA)")
        if public_key_der(key.public_key()) != public_key_der(cert.public_key()):
            raise HeKeyError("the TLS private key does not belong to the TLS certificate")
        self.private_key: PrivateKey = key
        self.cert = cert
        self.certificate = cert.public_bytes(serialization.Encoding.DER)
        self.identity = common_name(cert)

    def sign(self, message: bytes) -> bytes:
        key = self.private_key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(message, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(message)
        return key.sign(message, _PSS, hashes.SHA256())


# Given a certificate's serial number and the identity it names: why it must not be believed
# (revoked by the federation CA), or None.
Revoked = Callable[[int, str], str | None]


class FederationCa:
    """The federation CA (the CA file of mutual TLS), vouching for site certificates; `revoked`
    (fibemrss.platform.revocation: the CA's revocation list) refuses the certificates it names."""

    def __init__(self, ca_pem: bytes, revoked: Revoked | None = None) -> None:
        try:
            self._cas = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as error:
            raise HeKeyError(f"unreadable federation CA: {error}") from None
        self._revoked = revoked

    def check(
        self,
        certificate_der: bytes,
        identity: str,
        what: str,
        refused: type[HeKeyError],
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """The certificate that `what` (say "the mask key of a") carries, if the federation CA
        issued it, it is valid now and it names `identity`; else `refused` saying which failed."""
        try:
            with warnings.catch_warnings():  # a malformed certificate is refused below, not warned about
                warnings.simplefilter("ignore")
                cert = x509.load_der_x509_certificate(certificate_der)
        except (ValueError, x509.InvalidVersion):
            raise refused(f"{what} carries an unreadable certificate") from None
        if not any(_issued_by(cert, ca) for ca in self._cas):
            raise refused(f"the certificate on {what} is not issued by the federation CA")
        refusal = self._revoked(cert.serial_number, common_name(cert)) if self._revoked else None
        if refusal:
            raise refused(f"the certificate on {what} is refused: {refusal}")
        moment = now or datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise refused(f"the certificate on {what} is not valid now")
        named = common_name(cert)
        if named != identity:
            raise refused(f"{what} is signed by {named!r}, not {identity}")
        return cert


@dataclass(frozen=True)
class RevocationList:
    """An X.509 CRL that the federation CA signed: the serial numbers of the certificates it
    withdrew (a stolen key, a site that left) and when."""

    number: int  # the CRL's own number: a newer list has a larger one
    revoked: Mapping[int, datetime.datetime]
    this_update: datetime.datetime
    next_update: datetime.datetime | None

    @classmethod
    def from_pem(cls, crl_pem: bytes, ca_pem: bytes) -> RevocationList:
        """The list, if one of the CAs of `ca_pem` issued and signed it; else HeKeyError saying why."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                crl = x509.load_pem_x509_crl(crl_pem)
        except ValueError as error:
            raise HeKeyError(f"not a PEM certificate revocation list: {error}") from None
        try:
            cas = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as error:
            raise HeKeyError(f"unreadable federation CA: {error}") from None
        if not any(ca.subject == crl.issuer and _crl_signed_by(crl, ca) for ca in cas):
            raise HeKeyError("the revocation list is not signed by the federation CA")
        try:
            number = int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
        except x509.ExtensionNotFound:
            number = 0
        return cls(
            number=number,
            revoked={r.serial_number: r.revocation_date_utc for r in crl},
            this_update=crl.last_update_utc,
            next_update=crl.next_update_utc,
        )


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        return False
    try:
        return crl.is_signature_valid(public)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


def signature_valid(cert: x509.Certificate, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is the signature of `message` by the key of `cert` (as `SiteKey.sign`
    makes them); raises HeKeyError for a key type no site signs with."""
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, message)
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, _PSS, hashes.SHA256())
        else:
            raise HeKeyError(f"a certificate with a {type(public).__name__} cannot sign")
    except InvalidSignature:
        return False
    return True


def public_key_der(key: object) -> bytes:
    """The SubjectPublicKeyInfo of a public key, the form in which two keys are compared."""
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise HeKeyError(f"unsupported public key type {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_sha256(key: object) -> bytes:
    """The SHA-256 of a public key's SubjectPublicKeyInfo: what two sites compare out of band."""
    return hashlib.sha256(public_key_der(key)).digest()


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


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")
