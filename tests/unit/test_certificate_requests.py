"""Keys that never leave their site: each site makes its key and a signing request, the federation
CA signs requests (fibemrss.tools.certs), deciding every extension from the identity and never
holding a site's key. Real keys, requests and certificates from `cryptography`; the requests an
attacker sends are built with the same library."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fibemrss.he.site_certificates import SiteKey, public_key_der
from fibemrss.tools.certs import (
    CertificateAuthority,
    RequestRefused,
    create_ca,
    init_pki,
    request_certificate,
    sign_request,
    sign_request_file,
    write_request,
)
from fibemrss.tools.cli import main

PEM = serialization.Encoding.PEM


def csr_for(
    common_names: list[str],
    extensions: Sequence[x509.ExtensionType] = (),
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> bytes:
    """A request as anyone can build it, asking for whatever it likes."""
    signer = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(PEM)


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def alt_names(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    folder = tmp_path_factory.mktemp("ca")
    create_ca(folder)
    return CertificateAuthority.load(folder)


def test_the_ca_signs_a_request_and_never_sees_the_sites_key(tmp_path: Path) -> None:
    ca_dir, site = tmp_path / "ca", tmp_path / "site-a"
    create_ca(ca_dir)
    request = write_request(site, "agent@a", ["agent-a.fibemrss-a.svc"])
    assert (request.key.stat().st_mode & 0o777) == 0o600
    cert = sign_request_file(ca_dir, request.csr, site / "agent@a.crt")

    # The CA's folder holds its own two files and nothing of the site.
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.crt", "ca.key"]
    site_key = serialization.load_pem_private_key(request.key.read_bytes(), password=None)
    assert isinstance(site_key, ec.EllipticCurvePrivateKey)
    # The certificate carries the site's own public key, and the site's key belongs to it.
    assert public_key_der(cert.public_key()) == public_key_der(site_key.public_key())
    SiteKey((site / "agent@a.crt").read_bytes(), request.key.read_bytes(), "the test")
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agent@a"
    assert alt_names(cert) == [
        x509.DNSName("agent.a.fibemrss"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("agent-a.fibemrss-a.svc"),
    ]
    assert usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}


def test_init_is_the_same_ceremony_as_request_and_sign(tmp_path: Path, ca: CertificateAuthority) -> None:
    hostnames = {"gateway@a": ["gw.a.svc"]}
    made = init_pki(tmp_path, ["gateway@a", "operator@a", "aggregator@central"], hostnames)
    for identity, paths in made.items():
        by_init = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        _, csr = request_certificate(identity, hostnames.get(identity, []))
        by_sign = sign_request(ca, csr.public_bytes(PEM))
        assert by_init.subject == by_sign.subject, identity
        assert [e.value for e in by_init.extensions] == [e.value for e in by_sign.extensions], identity
        assert by_init.not_valid_after_utc - by_init.not_valid_before_utc == (
            by_sign.not_valid_after_utc - by_sign.not_valid_before_utc
        )
    # No request file is left behind by the one-process ceremony, only keys and certificates.
    assert not list(tmp_path.glob("*.csr"))


def test_the_ca_decides_the_extensions_not_the_request(ca: CertificateAuthority) -> None:
    greedy = [
        x509.BasicConstraints(ca=True, path_length=None),
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.SERVER_AUTH]),
    ]
    # A client-only identity asking to be a CA, sign code and serve gets a client certificate.
    cert = sign_request(ca, csr_for(["operator@a"], greedy))
    assert {type(e.value) for e in cert.extensions} == {x509.ExtendedKeyUsage, x509.SubjectAlternativeName}
    assert usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert alt_names(cert) == [x509.DNSName("operator.a.fibemrss")]
    # A serving one gets what its role gets, whatever it asked for.
    cert = sign_request(ca, csr_for(["gateway@a"], greedy))
    assert usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.BasicConstraints)
    # Names the CA adds itself, or asked for twice, are named once.
    twice = x509.SubjectAlternativeName([x509.DNSName(n) for n in ("localhost", "gw.a.svc", "gw.a.svc")])
    names = alt_names(sign_request(ca, csr_for(["gateway@a"], [twice])))
    assert names.count(x509.DNSName("localhost")) == names.count(x509.DNSName("gw.a.svc")) == 1


@pytest.mark.parametrize(
    ("names", "why"),
    [
        ([x509.DNSName("aggregator.central.fibemrss")], "under .fibemrss"),  # another identity's pin
        ([x509.DNSName("gateway.a.fibemrss")], "under .fibemrss"),
        ([x509.DNSName("Bad_Name.example")], "not a DNS host name"),
        ([x509.IPAddress(ipaddress.ip_address("198.18.0.7"))], "only for DNS host names"),
        ([x509.UniformResourceIdentifier("https://aggregator.example")], "only for DNS host names"),
    ],
)
def test_host_names_a_request_may_not_ask_for_are_refused(
    ca: CertificateAuthority, names: list[x509.GeneralName], why: str
) -> None:
    with pytest.raises(RequestRefused, match=f"subject alternative name: .*{why}"):
        sign_request(ca, csr_for(["gateway@a"], [x509.SubjectAlternativeName(names)]))


def test_a_client_only_identity_gets_no_host_name(ca: CertificateAuthority) -> None:
    ask = [x509.SubjectAlternativeName([x509.DNSName("ehr.example")])]
    with pytest.raises(RequestRefused, match="subject alternative name: ehr@a does not serve"):
        sign_request(ca, csr_for(["ehr@a"], ask))
    with pytest.raises(RequestRefused, match="ehr@a does not serve"):
        request_certificate("ehr@a", ["ehr.example"])


@pytest.mark.parametrize(
    "identity",
    [
        "agent@central",  # an agent belongs to a hospital
        "gateway@central",
        "inference@central",
        "aggregator@a",  # the aggregator is the central site's
        "nurse@a",  # no such role
        "mallory",
        "agent@",
        "@a",
        "agent@a@b",
        "Agent@a",
        "agent@-a",
        "agent@a.b",
        "",
    ],
)
def test_an_identity_the_federation_does_not_issue_is_refused_naming_the_common_name(
    ca: CertificateAuthority, identity: str
) -> None:
    with pytest.raises(RequestRefused, match="subject common name"):
        sign_request(ca, csr_for([identity] if identity else []))
    with pytest.raises(RequestRefused, match="subject common name"):
        request_certificate(identity)


def test_a_request_naming_two_identities_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(RequestRefused, match="subject common name: a request names exactly one identity"):
        sign_request(ca, csr_for(["agent@a", "aggregator@central"]))


def test_a_tampered_request_is_refused(ca: CertificateAuthority) -> None:
    _, csr = request_certificate("agent@a")
    der = csr.public_bytes(serialization.Encoding.DER)
    # The attacker's own key put into the site's request: the site's signature no longer covers it.
    theirs = public_key_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    site = public_key_der(csr.public_key())
    assert der.count(site) == 1 and len(theirs) == len(site)
    swapped = der.replace(site, theirs)
    # One bit of the signature changed.
    flipped = der[:-1] + bytes([der[-1] ^ 0x01])
    for tampered in (swapped, flipped):
        pem = x509.load_der_x509_csr(tampered).public_bytes(PEM)
        with pytest.raises(RequestRefused, match="certificate request signature: does not verify"):
            sign_request(ca, pem)
    # The genuine request still signs.
    sign_request(ca, csr.public_bytes(PEM))


def test_a_request_that_is_no_request_or_not_p256_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(RequestRefused, match="certificate request: not a PEM certificate signing request"):
        sign_request(ca, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(RequestRefused, match="certificate request public key: .*EC P-256"):
        sign_request(ca, csr_for(["agent@a"], key=rsa_key))
    with pytest.raises(RequestRefused, match="certificate request public key"):
        sign_request(ca, csr_for(["agent@a"], key=ec.generate_private_key(ec.SECP384R1())))


def test_the_cli_runs_the_ceremony_and_says_what_is_wrong_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, site = tmp_path / "ca", tmp_path / "site"
    assert main(["certs", "ca-init", "--out", str(ca_dir)]) == 0
    assert main(["certs", "ca-init", "--out", str(ca_dir)]) == 1  # a second CA would void the first
    assert "exists; refusing to replace it" in capsys.readouterr().err
    args = ["certs", "request", "--identity", "inference@b", "--out", str(site), "--hostname", "inf.b.svc"]
    assert main(args) == 0
    requested = json.loads(capsys.readouterr().out)
    assert main(args) == 1  # the site's key is not replaced by accident
    capsys.readouterr()
    out = site / "inference@b.crt"
    sign = ["certs", "sign", "--ca-dir", str(ca_dir), "--csr", requested["csr"], "--out", str(out)]
    assert main(sign) == 0
    signed = json.loads(capsys.readouterr().out)
    assert signed["identity"] == "inference@b" and "inf.b.svc" in signed["dns_names"]
    # The fingerprint the site tells the CA by a second channel is the certificate's key.
    assert signed["public_key_sha256"] == requested["public_key_sha256"]
    SiteKey(out.read_bytes(), (site / "inference@b.key").read_bytes(), "the test")

    bad = tmp_path / "bad.csr"
    bad.write_bytes(csr_for(["agent@central"]))
    assert main([*sign[:-4], "--csr", str(bad), "--out", str(tmp_path / "x.crt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fibemrss: subject common name: 'agent@central'") and err.count("\n") == 1
    assert not (tmp_path / "x.crt").exists()
