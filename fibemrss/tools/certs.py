"""A small private PKI for mutual TLS: one CA and a certificate per service identity.

An identity is "<role>@<site>" (agent@cleveland, aggregator@central, operator@central). It is
the certificate's common name, which servers read as the caller's identity. Each certificate
names only its own service: its identity as a DNS name ("aggregator.central.fibemrss", which
clients pin, `fibemrss.platform.identity`), and, for a serving role, loopback and the host
names given for that identity alone. Client-only roles (operator, ehr, ingest) cannot serve.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fibemrss.he.keys import write_private_file
from fibemrss.platform.identity import identity_dns_name

VALIDITY = datetime.timedelta(days=365)
# The roles that run a server; the others (operator, ehr, ingest) only call.
SERVING_ROLES = frozenset({"aggregator", "gateway", "agent", "inference"})


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """0600 from creation, never through a symbolic link (a new ceremony replaces the old key)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem, overwrite=True)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FIBEMRSS federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pin_name(identity: str) -> str | None:
    try:
        return identity_dns_name(identity)
    except ValueError:
        return None  # a name that is no identity (tests' "mallory"): nothing to pin


def subject_alternative_names(identity: str, hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """What the certificate of `identity` names: its pin name and, if it serves, its own hosts."""
    pin = _pin_name(identity)
    names: list[x509.GeneralName] = [x509.DNSName(pin)] if pin else []
    if identity.partition("@")[0] in SERVING_ROLES:
        names += [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        names += [x509.DNSName(h) for h in hostnames]
    return names


def init_pki(
    out_dir: Path, identities: list[str], hostnames: Mapping[str, Sequence[str]] | None = None
) -> dict[str, CertPaths]:
    """Writes ca.crt (and ca.key) and <identity>.crt/.key for each identity into out_dir.

    A serving identity's certificate is a server and client certificate naming its pin name,
    loopback and `hostnames[identity]` (its Kubernetes Service names); a client-only one is a
    client certificate naming its pin name alone.
    """
    unknown = sorted(set(hostnames or {}) - set(identities))
    if unknown:
        raise ValueError(f"host names given for identities without a certificate: {', '.join(unknown)}")
    for identity in hostnames or {}:
        if identity.partition("@")[0] not in SERVING_ROLES:
            raise ValueError(f"{identity} does not serve, so its certificate names no host")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("FIBEMRSS federation CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (out_dir / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out_dir / "ca.key", ca_key)
    out: dict[str, CertPaths] = {}
    for identity in identities:
        key = ec.generate_private_key(ec.SECP256R1())
        names = subject_alternative_names(identity, (hostnames or {}).get(identity, ()))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.partition("@")[0] in SERVING_ROLES:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(identity))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths = CertPaths(out_dir / f"{identity}.crt", out_dir / f"{identity}.key")
        paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(paths.key, key)
        out[identity] = paths
    return out
