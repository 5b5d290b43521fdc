"""A small private PKI for mutual TLS: one CA and a certificate per service identity.

An identity is "<role>@<site>" (agent@cleveland, aggregator@central, operator@central). It is
the certificate's common name, which servers read as the caller's identity. Each certificate
names only its own service: its identity as a DNS name ("aggregator.central.fibemrss", which
clients pin, `fibemrss.platform.identity`), and, for a serving role, loopback and the host
names given for that identity alone. Client-only roles (operator, ehr, ingest) cannot serve.

Keys never leave their site: a site makes its key and a certificate signing request
(`request_certificate`, `fibemrss certs request`); the federation CA signs the request
(`sign_request`, `fibemrss certs sign`), deciding every extension from the identity the request
names and never reading a private key. `init_pki` (`fibemrss certs init`) runs that same
ceremony for every identity in one process, for the demo and the tests.

A certificate whose key was stolen (or whose site left) is withdrawn with `revoke`
(`fibemrss certs revoke`): the CA's signed revocation list, which every service given
FIBEMRSS_TLS_CRL enforces on every call and every signed protocol message.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fibemrss.domain.errors import ConfigError
from fibemrss.he.errors import HeKeyError
from fibemrss.he.keys import write_private_file
from fibemrss.he.site_certificates import RevocationList, common_name, public_key_der
from fibemrss.platform.authorization import CENTRAL, check_hospital_name
from fibemrss.platform.identity import IDENTITY_DOMAIN, identity_dns_name, is_dns_label

VALIDITY = datetime.timedelta(days=365)
# The roles that run a server; the others (operator, ehr, ingest) only call.
SERVING_ROLES = frozenset({"aggregator", "gateway", "agent", "inference"})
# Which roles the CA issues at which site (DESIGN.md "Roles").
CENTRAL_ROLES = frozenset({"aggregator", "operator"})
HOSPITAL_ROLES = frozenset({"gateway", "agent", "inference", "operator", "ehr", "ingest"})
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
_ORGANIZATION = "FIBEMRSS federation"


class RequestRefused(ValueError):
    """The CA will not sign this request; the message names the field and the reason."""


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path


@dataclass(frozen=True)
class RequestPaths:
    """What `certs request` leaves at the site: the private key (stays) and the request (goes)."""

    key: Path
    csr: Path


@dataclass(frozen=True, eq=False)
class CertificateAuthority:
    """The federation CA: its certificate and the key that signs requests."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, ca_dir: Path) -> CertificateAuthority:
        """ca.crt and ca.key of `ca_dir`, checked to belong together."""
        try:
            certificate = x509.load_pem_x509_certificate((ca_dir / CA_CERT_FILE).read_bytes())
            key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), password=None)
        except ValueError as error:
            raise ValueError(f"{ca_dir}: unreadable {CA_CERT_FILE} or {CA_KEY_FILE}: {error}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or public_key_der(
            key.public_key()
        ) != public_key_der(certificate.public_key()):
            raise ValueError(f"{ca_dir}: {CA_KEY_FILE} is not the key of {CA_CERT_FILE}")
        return cls(certificate, key)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, overwrite: bool) -> None:
    """0600 from creation, never through a symbolic link."""
    write_private_file(path, private_key_pem(key), overwrite=overwrite)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pin_name(identity: str) -> str | None:
    try:
        return identity_dns_name(identity)
    except ValueError:
        return None  # a name that is no identity (tests' "mallory"): nothing to pin


def _serves(identity: str) -> bool:
    return identity.partition("@")[0] in SERVING_ROLES


def subject_alternative_names(identity: str, hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """What the certificate of `identity` names: its pin name and, if it serves, its own hosts."""
    pin = _pin_name(identity)
    names: list[x509.GeneralName] = [x509.DNSName(pin)] if pin else []
    if _serves(identity):
        names += [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        names += [x509.DNSName(h) for h in dict.fromkeys(hostnames) if x509.DNSName(h) not in names]
    return names


def check_identity(identity: str) -> None:
    """Raises RequestRefused unless the federation issues certificates to `identity`:
    "<role>@central" for the aggregator and the federation operator, "<role>@<hospital>" for a
    hospital's gateway, agent, inference service, operators and clinical software."""
    field = "subject common name"
    try:
        identity_dns_name(identity)
    except ValueError as error:
        raise RequestRefused(f"{field}: {error}") from None
    role, _, site = identity.partition("@")
    if site == CENTRAL:
        if role not in CENTRAL_ROLES:
            raise RequestRefused(
                f"{field}: {identity!r}: the central site has only {', '.join(sorted(CENTRAL_ROLES))} "
                "certificates (an agent, gateway or inference service belongs to a hospital)"
            )
        return
    try:
        check_hospital_name(site)
    except ConfigError as error:
        raise RequestRefused(f"{field}: {error}") from None
    if role not in HOSPITAL_ROLES:
        raise RequestRefused(
            f"{field}: {identity!r}: a hospital's roles are {', '.join(sorted(HOSPITAL_ROLES))}, not {role!r}"
        )


def check_hostname(identity: str, hostname: str) -> None:
    """A host name the certificate of `identity` may name: a serving role's DNS name, never a name
    under the identity domain (that is where every identity's pinned name lives)."""
    field = "subject alternative name"
    if not _serves(identity):
        raise RequestRefused(f"{field}: {identity} does not serve, so its certificate names no host")
    labels = hostname.split(".")
    if len(hostname) > 253 or not all(is_dns_label(label) for label in labels):
        raise RequestRefused(
            f"{field}: {hostname!r} is not a DNS host name (lowercase labels of letters, digits and "
            "inner hyphens)"
        )
    if labels[-1] == IDENTITY_DOMAIN:
        raise RequestRefused(
            f"{field}: {hostname!r} is under .{IDENTITY_DOMAIN}, where the CA names each identity "
            "itself (a certificate names only its own)"
        )


def create_ca(out_dir: Path, overwrite: bool = False, now: datetime.datetime | None = None) -> CertPaths:
    """Writes ca.crt and ca.key (0600) into out_dir: the federation CA alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    moment = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("FIBEMRSS federation CA")
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - datetime.timedelta(minutes=5))
        .not_valid_after(moment + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = CertPaths(out_dir / CA_CERT_FILE, out_dir / CA_KEY_FILE)
    _write_key(paths.key, key, overwrite)  # first: a refused key leaves the old ca.crt in place
    paths.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return paths


def request_certificate(
    identity: str, hostnames: Sequence[str] = ()
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    """The site's side: a new P-256 key and a request, signed with it, naming `identity` and the
    host names it asks to be named by (checked here too, so a site learns of a bad one at once)."""
    check_identity(identity)
    for hostname in hostnames:
        check_hostname(identity, hostname)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(identity))
    if hostnames:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False
        )
    return key, builder.sign(key, hashes.SHA256())


def write_request(
    out_dir: Path, identity: str, hostnames: Sequence[str] = (), overwrite: bool = False
) -> RequestPaths:
    """`certs request`: <identity>.key (0600, stays at the site) and <identity>.csr (to the CA)."""
    key, csr = request_certificate(identity, hostnames)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = RequestPaths(out_dir / f"{identity}.key", out_dir / f"{identity}.csr")
    _write_key(paths.key, key, overwrite)
    paths.csr.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return paths


def requested_hostnames(csr: x509.CertificateSigningRequest) -> list[str]:
    """The DNS names a request asks for; any other kind of name is refused (the CA adds loopback)."""
    try:
        requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    for name in requested:
        if not isinstance(name, x509.DNSName):
            raise RequestRefused(
                f"subject alternative name: a request may ask only for DNS host names, not "
                f"{type(name).__name__} {name.value!r} (the CA adds loopback to serving certificates)"
            )
        if name.value not in names:
            names.append(name.value)
    return names


def sign_request(
    ca: CertificateAuthority, csr_pem: bytes, now: datetime.datetime | None = None
) -> x509.Certificate:
    """The CA's side: checks the request and issues the certificate of the identity it names.

    Refused (RequestRefused, naming the field): an unreadable request, a signature that the key
    it carries did not make, a key that is not EC P-256, a subject that is not exactly one common
    name naming an identity the federation issues, or a host name the identity may not have.
    Every extension is the CA's own, decided from the identity (`issue_certificate`); none that
    the request asks for is copied.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as error:
        raise RequestRefused(
            f"certificate request: not a PEM certificate signing request ({error})"
        ) from None
    try:
        signed = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise RequestRefused(f"certificate request: unreadable public key or signature ({error})") from None
    if not signed:
        raise RequestRefused(
            "certificate request signature: does not verify with the public key the request carries "
            "(tampered with, or not made by that key's holder)"
        )
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise RequestRefused(
            f"certificate request public key: the federation's certificates carry EC P-256 keys, "
            f"not {type(public_key).__name__}"
        )
    common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1 or not isinstance(common_names[0].value, str):
        raise RequestRefused("subject common name: a request names exactly one identity <role>@<site>")
    identity = common_names[0].value
    check_identity(identity)
    try:
        hostnames = requested_hostnames(csr)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as error:
        raise RequestRefused(f"certificate request extensions: unreadable ({error})") from None
    for hostname in hostnames:
        check_hostname(identity, hostname)
    return issue_certificate(ca, public_key, identity, hostnames, now)


def issue_certificate(
    ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    identity: str,
    hostnames: Sequence[str] = (),
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """Builds and signs the certificate of `identity` for `public_key`: a serving identity's is a
    server and client certificate naming its pin name, loopback and `hostnames`; a client-only
    one's a client certificate naming its pin name alone. It checks nothing: `sign_request` holds
    the CA's rules (tests call this directly to stand for a CA that ignores them)."""
    moment = now or datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if _serves(identity):
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - datetime.timedelta(minutes=5))
        .not_valid_after(min(moment + VALIDITY, ca.certificate.not_valid_after_utc))
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    names = subject_alternative_names(identity, hostnames)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def sign_request_file(ca_dir: Path, csr_path: Path, out: Path) -> x509.Certificate:
    """`certs sign`: the certificate for the request at csr_path, written (PEM) to out."""
    certificate = sign_request(CertificateAuthority.load(ca_dir), csr_path.read_bytes())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate


def init_pki(
    out_dir: Path, identities: list[str], hostnames: Mapping[str, Sequence[str]] | None = None
) -> dict[str, CertPaths]:
    """The whole ceremony in one process (the demo, `fibemrss up`, tests): writes ca.crt (and
    ca.key) and <identity>.crt/.key for each identity into out_dir, each site's key made by
    `request_certificate` and its request signed by `sign_request`, as at separate sites."""
    unknown = sorted(set(hostnames or {}) - set(identities))
    if unknown:
        raise ValueError(f"host names given for identities without a certificate: {', '.join(unknown)}")
    for identity, names in (hostnames or {}).items():
        for hostname in names:
            check_hostname(identity, hostname)
    ca_paths = create_ca(out_dir, overwrite=True)
    ca = CertificateAuthority.load(ca_paths.cert.parent)
    out: dict[str, CertPaths] = {}
    for identity in identities:
        key, csr = request_certificate(identity, (hostnames or {}).get(identity, ()))
        certificate = sign_request(ca, csr.public_bytes(serialization.Encoding.PEM))
        paths = CertPaths(out_dir / f"{identity}.crt", out_dir / f"{identity}.key")
        _write_key(paths.key, key, overwrite=True)
        paths.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        out[identity] = paths
    return out


CRL_FILE = "crl.pem"
# How long a revocation list says it stays current: services keep enforcing an older list (a
# revocation is never forgotten), and warn once it is past this, so the CA re-issues it.
CRL_VALIDITY = datetime.timedelta(days=30)
REVOCATION_REASONS = {
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "unspecified": x509.ReasonFlags.unspecified,
}


def revoke(
    ca_dir: Path,
    certificates: Sequence[bytes] = (),
    reason: str = "key-compromise",
    now: datetime.datetime | None = None,
) -> Path:
    """`certs revoke` and `certs crl`: writes ca_dir/crl.pem, the CA's revocation list, signed,
    with every serial it already listed and those of `certificates` (PEM; each must be one this
    CA issued), a CRL number one above the last and a fresh validity. With no certificates it
    re-issues the list (`certs crl`). Services started with FIBEMRSS_TLS_CRL re-read the file
    within a second of a change (fibemrss.platform.revocation)."""
    if reason not in REVOCATION_REASONS:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REVOCATION_REASONS)}")
    ca = CertificateAuthority.load(ca_dir)
    moment = now or datetime.datetime.now(datetime.UTC)
    path = ca_dir / CRL_FILE
    listed: list[x509.RevokedCertificate] = []
    number = 0
    if path.exists():
        ca_pem = ca.certificate.public_bytes(serialization.Encoding.PEM)
        existing = path.read_bytes()
        try:
            number = RevocationList.from_pem(existing, ca_pem).number  # this CA's, nothing else
        except HeKeyError as error:
            raise ValueError(f"{path}: {error}") from None
        listed = list(x509.load_pem_x509_crl(existing))
    known = {r.serial_number for r in listed}
    for pem in certificates:
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError as error:
            raise ValueError(f"not a PEM certificate: {error}") from None
        if certificate.issuer != ca.certificate.subject:
            raise ValueError(f"{common_name(certificate)} was not issued by this CA: nothing to revoke")
        try:
            certificate.verify_directly_issued_by(ca.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError(f"{common_name(certificate)} was not issued by this CA: nothing to revoke") from None
        if certificate.serial_number in known:
            continue
        known.add(certificate.serial_number)
        listed.append(
            x509.RevokedCertificateBuilder()
            .serial_number(certificate.serial_number)
            .revocation_date(moment)
            .add_extension(x509.CRLReason(REVOCATION_REASONS[reason]), critical=False)
            .build()
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(moment)
        .next_update(moment + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number + 1), critical=False)
    )
    for entry in listed:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)  # whole or not at all: a service never reads half a list
    return path

