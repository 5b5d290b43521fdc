"""The HE secret key made at one hospital and delivered to another sealed to that hospital's own
agent key (fibemrss.he.key_delivery), attacked as the aggregator that relays it, another
hospital, or someone with a CA of their own would. Real certificates from the ceremony (each
site's request signed by the federation CA), real ECDH/AES-GCM/ECDSA, real TenSEAL keys."""

from __future__ import annotations

import dataclasses
import datetime
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from fibemrss.he import UpdateDecryptor, UpdateEncryptor, generate_keys, load_hospital_key
from fibemrss.he.key_delivery import KeyDeliveryRefused, SealedKey, open_hospital_key, seal_hospital_key
from fibemrss.he.site_certificates import SiteKey, public_key_sha256
from fibemrss.tools.certs import create_ca, init_pki, sign_request_file, write_request
from fibemrss.tools.cli import main

STUDY = "heart-disease-v1"


@dataclasses.dataclass(frozen=True)
class Federation:
    root: Path
    holder_key: bytes  # hospital.he made at hospital a, the study's key holder
    aggregator_key: bytes
    b_own_key: bytes  # a key b made itself (b is not the holder)

    def cert(self, identity: str, where: str = "sites") -> bytes:
        return (self.root / where / f"{identity}.crt").read_bytes()

    def key(self, identity: str, where: str = "sites") -> bytes:
        return (self.root / where / f"{identity}.key").read_bytes()

    def ca_pem(self, where: str = "ca") -> bytes:
        return (self.root / where / "ca.crt").read_bytes()

    def seal(
        self, to: str = "agent@b", by: str = "agent@a", key: bytes | None = None, study: str = STUDY
    ) -> bytes:
        return seal_hospital_key(
            self.holder_key if key is None else key,
            study=study,
            recipient_certificate_pem=self.cert(to),
            ca_pem=self.ca_pem(),
            signer_certificate_pem=self.cert(by),
            signer_key_pem=self.key(by),
        )

    def open(
        self,
        sealed: bytes,
        at: str = "agent@b",
        holder: str = "a",
        study: str = STUDY,
        now: datetime.datetime | None = None,
    ) -> bytes:
        return open_hospital_key(
            sealed,
            study=study,
            holder=holder,
            ca_pem=self.ca_pem(),
            certificate_pem=self.cert(at),
            private_key_pem=self.key(at),
            now=now,
        )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("sealed")
    create_ca(root / "ca")
    for identity in ("agent@a", "agent@b", "agent@c", "operator@b", "aggregator@central"):
        # Each site's key is made at the site; only its request travels to the CA and back.
        request = write_request(root / "sites", identity)
        sign_request_file(root / "ca", request.csr, request.csr.with_suffix(".crt"))
    assert sorted(p.name for p in (root / "ca").iterdir()) == ["ca.crt", "ca.key"]
    init_pki(root / "rogue", ["agent@a"])  # someone else's CA issuing the same name
    hospital, aggregator = generate_keys()
    b_own, _ = generate_keys()
    return Federation(root, hospital, aggregator, b_own)


def test_the_key_sealed_for_b_opens_at_b_and_decrypts_what_the_holder_encrypted(fed: Federation) -> None:
    sealed = fed.seal()
    assert fed.holder_key[-256:] not in sealed  # the secret key does not travel readable
    opened = fed.open(sealed)
    assert opened == fed.holder_key
    values = np.linspace(-1.0, 1.0, 50)
    chunks = UpdateEncryptor(load_hospital_key(fed.holder_key)).encrypt(values, 7)
    average, weight = UpdateDecryptor(load_hospital_key(opened)).decrypt_average(chunks, len(values))
    assert weight == 7
    np.testing.assert_allclose(average, values, atol=load_hospital_key(opened).params.average_error(1, 7))


def test_another_hospital_cannot_open_it(fed: Federation) -> None:
    sealed = fed.seal()
    with pytest.raises(KeyDeliveryRefused, match=r"addressed to agent@b, not to this hospital \(agent@c\)"):
        fed.open(sealed, at="agent@c")
    # Nor with b's certificate and its own key: the key must belong to the certificate.
    with pytest.raises(Exception, match="does not belong"):
        open_hospital_key(
            sealed,
            study=STUDY,
            holder="a",
            ca_pem=fed.ca_pem(),
            certificate_pem=fed.cert("agent@b"),
            private_key_pem=fed.key("agent@c"),
        )
    # The holder cannot open its own envelope for b either (it holds the key anyway).
    with pytest.raises(KeyDeliveryRefused, match="addressed to agent@b"):
        fed.open(sealed, at="agent@a")


def test_a_re_addressed_envelope_is_refused(fed: Federation) -> None:
    envelope = SealedKey.from_bytes(fed.seal())
    c_envelope = SealedKey.from_bytes(fed.seal(to="agent@c"))
    # The relay writes c's name on b's envelope: c's key is not the one it was sealed to.
    renamed = dataclasses.replace(envelope, recipient="agent@c")
    with pytest.raises(KeyDeliveryRefused, match="sealed to another key of agent@c"):
        fed.open(renamed.to_bytes(), at="agent@c")
    # ... and c's key digest too: the holder's signature no longer covers it.
    readdressed = dataclasses.replace(renamed, recipient_key=c_envelope.recipient_key)
    with pytest.raises(KeyDeliveryRefused, match="signature of agent@a on the sealed HE key does not cover"):
        fed.open(readdressed.to_bytes(), at="agent@c")
    # Another study's name on it.
    other_study = dataclasses.replace(envelope, study="another-study")
    with pytest.raises(KeyDeliveryRefused, match="does not cover"):
        fed.open(other_study.to_bytes(), study="another-study")
    with pytest.raises(KeyDeliveryRefused, match="sealed for study 'heart-disease-v1', not 'another-study'"):
        fed.open(envelope.to_bytes(), study="another-study")


def test_a_swapped_or_altered_ciphertext_is_refused(fed: Federation) -> None:
    envelope = SealedKey.from_bytes(fed.seal())
    # The ciphertext of another key sealed to b (the relay's choice of key for b).
    other = SealedKey.from_bytes(fed.seal(key=fed.b_own_key, by="agent@a"))
    swaps = {
        "another envelope's ciphertext": dataclasses.replace(envelope, ciphertext=other.ciphertext),
        "another ephemeral key and ciphertext": dataclasses.replace(
            envelope,
            ciphertext=other.ciphertext,
            ephemeral_public_key=other.ephemeral_public_key,
            nonce=other.nonce,
        ),
        "one bit of the ciphertext": dataclasses.replace(
            envelope, ciphertext=envelope.ciphertext[:-1] + bytes([envelope.ciphertext[-1] ^ 1])
        ),
        "no signature": dataclasses.replace(envelope, signature=b""),
    }
    for case, tampered in swaps.items():
        with pytest.raises(KeyDeliveryRefused, match="does not cover its content"):
            fed.open(tampered.to_bytes())
        assert case


def test_a_key_signed_under_another_ca_or_by_another_identity_is_refused(fed: Federation) -> None:
    # A rogue CA's agent@a (sealing with a CA bundle that lets its own checks pass).
    forged = seal_hospital_key(
        fed.holder_key,
        study=STUDY,
        recipient_certificate_pem=fed.cert("agent@b"),
        ca_pem=fed.ca_pem() + fed.ca_pem("rogue"),
        signer_certificate_pem=fed.cert("agent@a", "rogue"),
        signer_key_pem=fed.key("agent@a", "rogue"),
    )
    assert SealedKey.from_bytes(forged).sender == "agent@a"
    with pytest.raises(KeyDeliveryRefused, match="not issued by the federation CA"):
        fed.open(forged)
    # The aggregator's genuine certificate (of the federation CA) re-signing a's envelope.
    aggregator = SiteKey(fed.cert("aggregator@central"), fed.key("aggregator@central"), "the attack")
    envelope = SealedKey.from_bytes(fed.seal())
    resigned = dataclasses.replace(envelope, sender_certificate=aggregator.certificate)
    resigned = dataclasses.replace(resigned, signature=aggregator.sign(resigned.signed_part()))
    with pytest.raises(KeyDeliveryRefused, match="signed by 'aggregator@central', not agent@a"):
        fed.open(resigned.to_bytes())
    # An expired holder certificate.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    with pytest.raises(KeyDeliveryRefused, match="not valid now"):
        fed.open(fed.seal(), now=later)


def test_a_key_sealed_by_a_hospital_that_is_not_the_studys_holder_is_refused(fed: Federation) -> None:
    # b makes a key of its own and sends it to c: c's study names a as the holder.
    sealed = fed.seal(to="agent@c", by="agent@b", key=fed.b_own_key)
    with pytest.raises(KeyDeliveryRefused, match="sealed by agent@b, but the study's key holder is agent@a"):
        fed.open(sealed, at="agent@c", holder="a")
    assert fed.open(sealed, at="agent@c", holder="b") == fed.b_own_key  # had the study named b


def test_the_holder_seals_only_a_hospital_key_to_an_agent_of_the_federation_ca(fed: Federation) -> None:
    # A recipient certificate substituted on the way: another CA's, the aggregator's, an operator's.
    for recipient, why in (
        (fed.cert("agent@a", "rogue"), "the recipient certificate is not issued by the federation CA"),
        (fed.cert("aggregator@central"), "names 'aggregator@central': the HE key goes only"),
        (fed.cert("operator@b"), "names 'operator@b'"),
    ):
        with pytest.raises(KeyDeliveryRefused, match=why):
            seal_hospital_key(
                fed.holder_key,
                study=STUDY,
                recipient_certificate_pem=recipient,
                ca_pem=fed.ca_pem(),
                signer_certificate_pem=fed.cert("agent@a"),
                signer_key_pem=fed.key("agent@a"),
            )
    with pytest.raises(Exception, match="holds no secret key"):
        fed.seal(key=fed.aggregator_key)
    with pytest.raises(KeyDeliveryRefused, match="study ''"):
        fed.seal(study="")


@pytest.fixture(scope="module")
def sealed_for_b(fed: Federation) -> bytes:
    return fed.seal()


@settings(max_examples=80, deadline=None)
@given(position=st.integers(min_value=0), cut=st.integers(min_value=0), junk=st.binary(max_size=64))
def test_a_damaged_envelope_is_refused_never_an_unexpected_error(
    fed: Federation, sealed_for_b: bytes, position: int, cut: int, junk: bytes
) -> None:
    sealed = sealed_for_b
    flipped = bytearray(sealed)
    flipped[position % len(sealed)] ^= 0x01
    for damaged in (bytes(flipped), sealed[: cut % len(sealed)], junk, sealed + b"\x00"):
        with pytest.raises(KeyDeliveryRefused):
            fed.open(damaged)


def test_the_cli_delivers_the_key_and_says_what_is_wrong_in_one_line(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = fed.root / "sites"
    (tmp_path / "hospital.he").write_bytes(fed.holder_key)
    sealed = tmp_path / "for-b.sealed"
    seal = ["keys", "seal", "--key", str(tmp_path / "hospital.he"), "--for", str(sites / "agent@b.crt")]
    seal += ["--ca", str(fed.root / "ca" / "ca.crt"), "--study", STUDY, "--out", str(sealed)]
    seal += ["--signer-cert", str(sites / "agent@a.crt"), "--signer-key", str(sites / "agent@a.key")]
    assert main(seal) == 0
    said = json.loads(capsys.readouterr().out)
    b_cert = x509.load_pem_x509_certificate(fed.cert("agent@b"))
    assert said["to"] == "agent@b"
    assert said["to_public_key_sha256"] == public_key_sha256(b_cert.public_key()).hex()

    def open_at(identity: str, out: Path) -> int:
        return main(
            ["keys", "open", "--sealed", str(sealed), "--ca", str(fed.root / "ca" / "ca.crt")]
            + ["--cert", str(sites / f"{identity}.crt"), "--key", str(sites / f"{identity}.key")]
            + ["--study", STUDY, "--holder", "a", "--out", str(out)]
        )

    assert open_at("agent@c", tmp_path / "c" / "hospital.he") == 1
    err = capsys.readouterr().err
    assert err == "fibemrss: the HE key is addressed to agent@b, not to this hospital (agent@c)\n"
    assert not (tmp_path / "c" / "hospital.he").exists()
    assert open_at("agent@b", tmp_path / "b" / "hospital.he") == 0
    opened = tmp_path / "b" / "hospital.he"
    assert opened.read_bytes() == fed.holder_key
    assert stat.S_IMODE(opened.stat().st_mode) == 0o600


def test_with_the_revocation_list_a_revoked_holder_or_recipient_is_refused(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A thief of agent@a's key seals a key of its own making as the study's holder (or a holder
    seals to a hospital whose key was stolen): without the CA's list both go through; with
    `--crl` after `certs revoke`, both are refused naming the revocation."""
    sites, ca = fed.root / "sites", fed.root / "ca"
    (tmp_path / "forged.he").write_bytes(fed.b_own_key)  # a key the thief made, sealed as agent@a
    sealed = tmp_path / "forged.sealed"
    seal = ["keys", "seal", "--key", str(tmp_path / "forged.he"), "--for", str(sites / "agent@b.crt")]
    seal += ["--ca", str(ca / "ca.crt"), "--study", STUDY, "--out", str(sealed)]
    seal += ["--signer-cert", str(sites / "agent@a.crt"), "--signer-key", str(sites / "agent@a.key")]
    assert main(seal) == 0
    opening = ["keys", "open", "--sealed", str(sealed), "--ca", str(ca / "ca.crt"), "--study", STUDY]
    opening += ["--cert", str(sites / "agent@b.crt"), "--key", str(sites / "agent@b.key"), "--holder", "a"]
    assert main([*opening, "--out", str(tmp_path / "before" / "hospital.he")]) == 0  # believed
    capsys.readouterr()
    assert main(["certs", "revoke", "--ca-dir", str(ca), "--cert", str(sites / "agent@a.crt")]) == 0
    assert main(["certs", "revoke", "--ca-dir", str(ca), "--cert", str(sites / "agent@c.crt")]) == 0
    capsys.readouterr()
    crl = ["--crl", str(ca / "crl.pem")]
    assert main([*opening, *crl, "--out", str(tmp_path / "after" / "hospital.he")]) == 1
    err = capsys.readouterr().err
    assert "the sealed HE key is refused" in err and "agent@a" in err and "revoked" in err, err
    assert not (tmp_path / "after" / "hospital.he").exists()
    (tmp_path / "hospital.he").write_bytes(fed.holder_key)
    to_c = ["keys", "seal", "--key", str(tmp_path / "hospital.he"), "--for", str(sites / "agent@c.crt")]
    to_c += ["--ca", str(ca / "ca.crt"), "--study", STUDY, "--out", str(tmp_path / "c.sealed")]
    to_c += ["--signer-cert", str(sites / "agent@b.crt"), "--signer-key", str(sites / "agent@b.key")]
    assert main([*to_c, *crl]) == 1
    err = capsys.readouterr().err
    assert "the recipient certificate is refused" in err and "agent@c" in err and "revoked" in err, err


def test_the_local_cluster_runs_the_same_ceremony_each_hospital_opening_its_own_sealed_key(
    tmp_path: Path,
) -> None:
    """`fibemrss up` and the demo: the holder (the first hospital) makes the key pair; every other
    hospital's agent gets its own file, opened from an envelope sealed to its agent key."""
    import os
    import stat

    from fibemrss.he.keys import load_hospital_key
    from fibemrss.tools.local_cluster import LocalCluster

    cluster = LocalCluster(tmp_path, ("a", "b", "c"))
    cluster._make_certs()  # noqa: SLF001 - the ceremony without starting any service
    cluster._make_keys()  # noqa: SLF001
    files = {h: cluster.hospital_key_file(h) for h in ("a", "b", "c")}
    assert len(set(files.values())) == 3  # a file per hospital
    holder = load_hospital_key(files["a"].read_bytes())
    for h in ("b", "c"):
        assert stat.S_IMODE(os.stat(files[h]).st_mode) == 0o600
        assert load_hospital_key(files[h].read_bytes()).key_id == holder.key_id
