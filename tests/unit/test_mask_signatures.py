"""Signed round mask keys (fibemrss.he.mask_signatures) with real certificates from the
federation's PKI tool: a key verifies only for its own federation, task, round and agent, and only
under a certificate the federation CA issued to `agent@<that hospital>`."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibemrss.he.errors import HeKeyError
from fibemrss.he.mask_signatures import MaskKeyRefused, MaskKeySigner, MaskKeyVerifier, SignedMaskKey
from fibemrss.tools.certs import init_pki

FED = b"\x01" * 16
KEY = b"\x07" * 32


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    real, rogue = tmp_path_factory.mktemp("real"), tmp_path_factory.mktemp("rogue")
    init_pki(real, ["agent@a", "agent@b", "aggregator@central"])
    init_pki(rogue, ["agent@a"])  # a CA the federation never trusted, issuing the same names
    return real, rogue


def signer(folder: Path, identity: str) -> MaskKeySigner:
    return MaskKeySigner((folder / f"{identity}.crt").read_bytes(), (folder / f"{identity}.key").read_bytes())


def test_a_signed_key_verifies_for_its_own_round_and_nothing_else(pki: tuple[Path, Path]) -> None:
    real, rogue = pki
    verifier = MaskKeyVerifier((real / "ca.crt").read_bytes())
    signed = signer(real, "agent@a").sign(FED, "task", 3, "a", KEY)
    verifier.check(FED, "task", 3, "a", signed)  # the genuine key passes

    refusals = {
        "another key under a's signature": (
            FED,
            "task",
            3,
            "a",
            dataclasses.replace(signed, public_key=b"\x08" * 32),
        ),
        "another round": (FED, "task", 4, "a", signed),
        "another federation": (b"\x02" * 16, "task", 3, "a", signed),
        "another task": (FED, "other", 3, "a", signed),
        "presented as b's": (FED, "task", 3, "b", signed),
        "unsigned": (FED, "task", 3, "a", SignedMaskKey(KEY)),
        "a rogue CA's agent@a": (
            FED,
            "task",
            3,
            "a",
            signer(rogue, "agent@a").sign(FED, "task", 3, "a", KEY),
        ),
        "garbage certificate": (FED, "task", 3, "a", dataclasses.replace(signed, certificate=b"junk")),
    }
    for case, (fed, task, number, hospital, key) in refusals.items():
        with pytest.raises(MaskKeyRefused) as refused:
            verifier.check(fed, task, number, hospital, key)
        assert hospital in str(refused.value), case

    # A certificate of the right CA but another identity (the aggregator's) signing as a.
    aggregator = signer(real, "aggregator@central")
    with pytest.raises(HeKeyError, match="agent@a"):
        aggregator.sign(FED, "task", 3, "a", KEY)
    forged = dataclasses.replace(signed, certificate=aggregator.certificate)
    with pytest.raises(MaskKeyRefused, match="aggregator@central"):
        verifier.check(FED, "task", 3, "a", forged)
    # An expired certificate.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    with pytest.raises(MaskKeyRefused, match="not valid now"):
        verifier.check(FED, "task", 3, "a", signed, now=later)


def test_a_signer_refuses_a_key_that_is_not_its_certificates(pki: tuple[Path, Path]) -> None:
    real, _ = pki
    with pytest.raises(HeKeyError, match="does not belong"):
        MaskKeySigner((real / "agent@a.crt").read_bytes(), (real / "agent@b.key").read_bytes())


@settings(max_examples=60, deadline=None)
@given(signature=st.binary(max_size=200), certificate=st.binary(max_size=600), flip=st.integers(0, 10_000))
def test_junk_signatures_and_certificates_are_refused_never_an_unexpected_error(
    pki: tuple[Path, Path], signature: bytes, certificate: bytes, flip: int
) -> None:
    real, _ = pki
    verifier = MaskKeyVerifier((real / "ca.crt").read_bytes())
    genuine = signer(real, "agent@a").sign(FED, "task", 3, "a", KEY)
    # Random bytes, and the genuine certificate or signature with one byte changed.
    cert = bytearray(genuine.certificate)
    cert[flip % len(cert)] ^= 0x01
    sig = bytearray(genuine.signature)
    sig[flip % len(sig)] ^= 0x01
    for key in (
        SignedMaskKey(KEY, signature, certificate),
        SignedMaskKey(KEY, genuine.signature, bytes(cert)),
        SignedMaskKey(KEY, bytes(sig), genuine.certificate),
        SignedMaskKey(KEY, signature, genuine.certificate),
    ):
        with pytest.raises(MaskKeyRefused):
            verifier.check(FED, "task", 3, "a", key)
