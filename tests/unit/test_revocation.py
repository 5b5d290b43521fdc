"""The federation CA's revocation list, read and enforced (fibemrss.platform.revocation), with
real certificates and real CRLs signed by `fibemrss.tools.certs.revoke`."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest

from fibemrss.domain.errors import ConfigError
from fibemrss.he.mask_signatures import MaskKeyRefused, MaskKeySigner, MaskKeyVerifier
from fibemrss.platform.config import ServerConfig
from fibemrss.platform.revocation import Revocations
from fibemrss.tools.certs import CRL_FILE, init_pki, revoke


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_pki(tmp_path / "pki", ["agent@a", "agent@b"])
    return tmp_path / "pki"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serial(pki: Path, identity: str) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate((pki / f"{identity}.crt").read_bytes()).serial_number


def test_a_revocation_is_enforced_after_the_recheck_and_names_the_certificate(pki: Path) -> None:
    crl = revoke(pki)  # the empty list, as a federation starts
    clock = Clock()
    revocations = Revocations(str(crl), str(pki / "ca.crt"), recheck_seconds=1.0, clock=clock)
    a, b = serial(pki, "agent@a"), serial(pki, "agent@b")
    assert revocations.refusal(a, "agent@a") is None
    revoke(pki, [(pki / "agent@a.crt").read_bytes()])
    clock.now = 0.5
    assert revocations.refusal(a, "agent@a") is None  # not re-read within the recheck interval
    clock.now = 1.5
    refusal = revocations.refusal(a, "agent@a")
    assert refusal is not None and "agent@a" in refusal and f"{a:x}" in refusal and "revoked" in refusal
    assert revocations.refusal(b, "agent@b") is None
    # The forms the edges hand over: PEM (gRPC) and getpeercert()'s hexadecimal serial (TLS sockets).
    assert revocations.refusal_for_pem((pki / "agent@a.crt").read_bytes(), "agent@a") == refusal
    assert revocations.refusal_for_hex(f"{a:X}", "agent@a") == refusal
    assert revocations.refusal_for_hex(None, "agent@a") is not None  # no serial: not believed


def test_an_older_list_or_one_of_another_ca_never_brings_a_certificate_back(pki: Path, tmp_path: Path) -> None:
    served = tmp_path / "served-crl.pem"  # the service's copy; the CA keeps its own
    shutil.copy(revoke(pki), served)
    older = tmp_path / "older.pem"
    shutil.copy(served, older)
    shutil.copy(revoke(pki, [(pki / "agent@a.crt").read_bytes()]), served)
    clock = Clock()
    revocations = Revocations(str(served), str(pki / "ca.crt"), clock=clock)
    a = serial(pki, "agent@a")
    assert revocations.refusal(a, "agent@a")
    # An attacker who can write the service's file puts back the list from before the revocation ...
    shutil.copy(older, served)
    clock.now += 5
    assert revocations.refusal(a, "agent@a"), "an older list (smaller CRL number) was taken"
    # ... or a list its own CA signed, or junk.
    other = tmp_path / "other"
    init_pki(other, ["agent@a"])
    shutil.copy(revoke(other), served)
    clock.now += 5
    assert revocations.refusal(a, "agent@a"), "a list of another CA was taken"
    served.write_bytes(b"-----BEGIN X509 CRL-----\njunk\n-----END X509 CRL-----\n")
    clock.now += 5
    assert revocations.refusal(a, "agent@a")
    # The CA's next list is taken: it keeps every entry and counts on.
    shutil.copy(revoke(pki), served)
    clock.now += 5
    assert revocations.refusal(a, "agent@a")
    assert revocations.number == 3


def test_a_list_the_federation_ca_did_not_sign_stops_the_service_naming_the_variable(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    init_pki(other, ["agent@a"])
    with pytest.raises(ConfigError, match="FIBEMRSS_TLS_CRL=.*not signed by the federation CA"):
        Revocations(str(revoke(other)), str(pki / "ca.crt"))
    with pytest.raises(ConfigError, match="FIBEMRSS_TLS_CRL=.*No such file"):
        Revocations(str(tmp_path / "absent.pem"), str(pki / "ca.crt"))
    monkeypatch.setenv("FIBEMRSS_TLS_CRL", str(pki / CRL_FILE))
    with pytest.raises(ConfigError, match="FIBEMRSS_TLS_CRL needs mutual TLS"):
        ServerConfig.from_env()


def test_revoke_refuses_a_certificate_of_another_ca_and_keeps_every_earlier_entry(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_pki(other, ["agent@a"])
    with pytest.raises(ValueError, match="agent@a was not issued by this CA"):
        revoke(pki, [(other / "agent@a.crt").read_bytes()])
    revoke(pki, [(pki / "agent@a.crt").read_bytes()])
    revoke(pki, [(pki / "agent@b.crt").read_bytes()])
    revoke(pki, [(pki / "agent@b.crt").read_bytes()])  # again: listed once
    revocations = Revocations(str(pki / CRL_FILE), str(pki / "ca.crt"))
    assert revocations.number == 3
    assert revocations.refusal(serial(pki, "agent@a"), "agent@a")
    assert revocations.refusal(serial(pki, "agent@b"), "agent@b")


def test_a_mask_key_signed_under_a_revoked_certificate_is_refused_by_every_hospital(pki: Path) -> None:
    """A stolen agent key signs a round's mask key as that hospital (what a lying aggregator
    holding it would relay): believed until the CA revokes the certificate, refused after."""
    ca_pem = (pki / "ca.crt").read_bytes()
    signer = MaskKeySigner((pki / "agent@a.crt").read_bytes(), (pki / "agent@a.key").read_bytes())
    key = signer.sign(b"f" * 16, "heart-disease-v1", 3, "a", b"k" * 32)
    clock = Clock()
    revocations = Revocations(str(revoke(pki)), str(pki / "ca.crt"), clock=clock)
    verifier = MaskKeyVerifier(ca_pem, revocations.refusal)
    verifier.check(b"f" * 16, "heart-disease-v1", 3, "a", key)  # believed
    revoke(pki, [(pki / "agent@a.crt").read_bytes()])
    clock.now += 5
    with pytest.raises(MaskKeyRefused, match="the certificate on the mask key of a is refused: .*revoked"):
        verifier.check(b"f" * 16, "heart-disease-v1", 3, "a", key)
    # Without the list (the code before it), the same key is still believed.
    MaskKeyVerifier(ca_pem).check(b"f" * 16, "heart-disease-v1", 3, "a", key)


def test_a_list_past_its_next_update_is_still_enforced(pki: Path) -> None:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=90)
    crl = revoke(pki, [(pki / "agent@a.crt").read_bytes()], now=long_ago)
    revocations = Revocations(str(crl), str(pki / "ca.crt"), recheck_seconds=0.0)
    assert revocations.refusal(serial(pki, "agent@a"), "agent@a")
    pem = (pki / "agent@b.crt").read_bytes()
    assert revocations.refusal_for_pem(pem, "agent@b") is None
