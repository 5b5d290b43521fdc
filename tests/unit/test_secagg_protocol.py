"""Secure aggregation against a lying aggregator (fibemrss.he.secagg), with the real HE codec and
real signatures from the federation's PKI tool. Each test plays the aggregator as an attacker
relaying the protocol's messages (it sees every one of them and may change, drop or show
different things to different hospitals) and shows what it gets: the exact sum of the survivors
when it follows the protocol, nothing readable of any one hospital when it lies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.codec import UpdateCodec, UpdateDecryptor, pack_slots, slot_count, unpack_slots
from fibemrss.he.keys import HospitalKey, generate_keys, load_hospital_key
from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier
from fibemrss.he.masking import MaskKeyPair, expand_mask, remove_mask
from fibemrss.he.secagg import graph as graphs
from fibemrss.he.secagg.protocol import (
    ProtocolRefused,
    RoundContext,
    RoundTranscript,
    SecAggMember,
    Signatures,
    Signed,
    _pair_seed,
    decode_reveal,
    survivors_statement,
    unmask_correction,
)
from fibemrss.he.secagg.shamir import PRIME, Share, ShareError, combine, split
from fibemrss.tools.certs import init_pki

NAMES = ("a", "b", "c", "d")
ROSTER = frozenset(NAMES)
CTX = RoundContext(b"f" * 16, "t", "sha256:" + "0" * 64, 3)
N_VALUES = 40


@pytest.fixture(scope="module")
def key() -> HospitalKey:
    return load_hospital_key(generate_keys()[0])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    init_pki(folder, [f"agent@{n}" for n in NAMES] + ["agent@e"])
    return folder


def signatures(pki: Path, name: str) -> Signatures:
    signer = MaskKeySigner((pki / f"agent@{name}.crt").read_bytes(), (pki / f"agent@{name}.key").read_bytes())
    return Signatures(signer, MaskKeyVerifier((pki / "ca.crt").read_bytes()))


def members(
    pki: Path, key: HospitalKey, names: tuple[str, ...] = NAMES, min_c: int = 3
) -> dict[str, SecAggMember]:
    return {
        n: SecAggMember(n, CTX, signatures(pki, n), ROSTER, min_c, key.params.plain_modulus) for n in names
    }


def shared(pki: Path, key: HospitalKey) -> dict[str, SecAggMember]:
    """Four members through the advertise and share stages, relayed honestly (U2: all four)."""
    ms = members(pki, key)
    adverts = {n: m.signed_advert() for n, m in ms.items()}
    for m in ms.values():
        m.accept_cohort(adverts)
    boxes = {n: m.share_boxes() for n, m in ms.items()}
    for n, m in ms.items():
        m.accept_shares(frozenset(NAMES), {s: b[n] for s, b in boxes.items() if n in b})
    return ms


def updates() -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(7)
    return {n: (rng.uniform(-1, 1, N_VALUES), 100 + 10 * i) for i, n in enumerate(NAMES)}


@dataclasses.dataclass
class Played:
    members: dict[str, SecAggMember]
    uploads: dict[str, list[bytes]]
    transcript: RoundTranscript


def play(
    pki: Path,
    key: HospitalKey,
    drop_before_upload: frozenset[str] = frozenset(),
    drop_after_upload: frozenset[str] = frozenset(),
) -> Played:
    """An honest aggregator relaying one round; members in drop_* stop at that stage."""
    ms = shared(pki, key)
    codec = UpdateCodec(key)
    adverts = {n: m.signed_advert() for n, m in ms.items()}
    u2 = frozenset(ms)
    n_slots = slot_count(ChunkKind.WEIGHTED_UPDATE, N_VALUES, key.params)
    uploads = {
        n: codec.encrypt(v, w, ms[n].mask(n_slots))
        for n, (v, w) in updates().items()
        if n not in drop_before_upload
    }
    u3 = frozenset(uploads)
    online = u3 - drop_after_upload
    signed = {n: ms[n].sign_survivors(u3) for n in online}
    reveals = {n: ms[n].reveal(u3, signed) for n in online}
    return Played(ms, uploads, RoundTranscript(adverts, u2, u3, signed, reveals))


def summed(key: HospitalKey, uploads: dict[str, list[bytes]], names: frozenset[str]) -> list[bytes]:
    codec = UpdateCodec(key)
    return [codec.add([uploads[n][0] for n in sorted(names)])]


@pytest.mark.parametrize(
    "before, after",
    [(frozenset(), frozenset()), (frozenset({"c"}), frozenset()), (frozenset(), frozenset({"d"}))],
)
def test_the_survivors_exact_sum_with_a_dropout_at_any_stage(
    pki: Path, key: HospitalKey, before: frozenset[str], after: frozenset[str]
) -> None:
    played = play(pki, key, before, after)
    u3 = played.transcript.u3
    correction = unmask_correction(
        CTX,
        played.transcript,
        signatures(pki, "a"),
        ROSTER,
        3,
        slot_count(ChunkKind.WEIGHTED_UPDATE, N_VALUES, key.params),
        key.params.plain_modulus,
    )
    average, weight = UpdateCodec(key).decrypt_average(
        summed(key, played.uploads, u3), N_VALUES, 3, correction
    )
    expected = updates()
    total = sum(expected[n][1] for n in u3)
    assert weight == total
    want = sum(expected[n][0] * expected[n][1] for n in u3) / total
    assert np.max(np.abs(average - want)) <= key.params.average_error(len(u3), total)


def test_no_upload_decrypts_to_its_update(pki: Path, key: HospitalKey) -> None:
    played = play(pki, key)
    raw = UpdateDecryptor(key).decrypt_slots(played.uploads["a"], N_VALUES)
    assert unpack_slots(raw, key.params, N_VALUES + 1)[0] != updates()["a"][1]  # the weight is masked too
    assert np.mean(np.abs(raw[1:]) > 2**30) > 0.9  # uniform mod t, not a fixed-point update


def test_claiming_a_dropout_after_the_upload_reveals_nothing_of_it(pki: Path, key: HospitalKey) -> None:
    """The restart attack: the aggregator holds d's upload but tells everyone d dropped (U3 without
    d), so the survivors reveal d's mask key; with c's HE key it removes every pairwise mask from
    d's upload. The self-mask, whose shares nobody revealed, still hides d's update."""
    lie = frozenset({"a", "b", "c"})
    honest = shared(pki, key)
    codec = UpdateCodec(key)
    n_slots = slot_count(ChunkKind.WEIGHTED_UPDATE, N_VALUES, key.params)
    x_d, w_d = updates()["d"]
    d_upload = codec.encrypt(x_d, w_d, honest["d"].mask(n_slots))  # the aggregator keeps it
    signed = {n: honest[n].sign_survivors(lie) for n in lie}
    reveals = {n: honest[n].reveal(lie, signed) for n in lie}
    # The aggregator (with c's help) reconstructs d's mask key from the s shares revealed...
    s_shares = [
        sh
        for n in lie
        for owner, kind, sh in decode_reveal(reveals[n][0], n)
        if owner == "d" and kind == b"s"
    ]
    b_shares = [
        sh
        for n in lie
        for owner, kind, sh in decode_reveal(reveals[n][0], n)
        if owner == "d" and kind == b"b"
    ]
    assert not b_shares  # nobody revealed d's self-mask seed
    d_secret = combine(s_shares[:3])
    d_pair = MaskKeyPair(d_secret)
    assert d_pair.public_key == honest["d"].advert.mask_key
    pairwise = np.zeros(n_slots, dtype=np.int64)
    for peer in ("a", "b", "c"):
        m = expand_mask(
            _pair_seed(d_pair, honest[peer].advert.mask_key, CTX, "d", peer),
            n_slots,
            key.params.plain_modulus,
        )
        pairwise = (pairwise + (m if "d" < peer else -m)) % key.params.plain_modulus
    raw = UpdateDecryptor(key).decrypt_slots(d_upload, N_VALUES)
    stripped = remove_mask(raw, pairwise, key.params.plain_modulus)
    # ... and still reads only the self-mask's noise: neither the weight nor the values
    assert unpack_slots(stripped, key.params, N_VALUES + 1)[0] != w_d
    fixed = pack_slots(np.concatenate([[w_d], np.rint(x_d * w_d * 2.0**key.params.frac_bits)]), key.params)
    assert not np.any(np.abs(stripped - fixed) < 2**30)  # slots uniform modulo t (~2^52)
    # And the two shares it holds of d's seed (c's own and nobody else's) are below the threshold.
    assert honest["d"].cohort is not None and honest["d"].cohort.threshold("d") == 3


def test_a_survivor_never_reveals_both_shares_of_one_member(pki: Path, key: HospitalKey) -> None:
    """The aggregator shows a U3 with d to a and d, and one without d to b; c colludes and signs
    both. a reveals d's b share; b refuses: only b and c signed its view, below the threshold."""
    ms = shared(pki, key)
    full, without_d = frozenset(NAMES), frozenset({"a", "b", "c"})
    sig_full = {n: ms[n].sign_survivors(full) for n in ("a", "d")}
    cohort = ms["a"].cohort
    assert cohort is not None
    colluder = signatures(pki, "c")  # c's key signs anything the aggregator wants
    sig_c_full = colluder.sign(survivors_statement(CTX, cohort.digest, full))
    sig_c_without = colluder.sign(survivors_statement(CTX, cohort.digest, without_d))
    payload, _ = ms["a"].reveal(full, {**sig_full, "c": sig_c_full})
    assert payload
    sig_b = ms["b"].sign_survivors(without_d)
    with pytest.raises(ProtocolRefused, match="fewer than the threshold"):
        ms["b"].reveal(without_d, {"b": sig_b, "c": sig_c_without})
    # And a survivor asked for another survivor set after signing one refuses it outright.
    with pytest.raises(ProtocolRefused, match="second, different survivor set"):
        ms["a"].sign_survivors(without_d)
    with pytest.raises(ProtocolRefused, match="did not sign"):
        ms["a"].reveal(without_d, {})


def test_a_cohort_of_colluders_or_strangers_is_refused(pki: Path, key: HospitalKey) -> None:
    """The aggregator shows honest a a cohort small enough for its colluders to read a's update, or
    one naming a site the study does not list: a refuses before it shares anything."""
    small = members(pki, key, ("a", "c"), min_c=2)
    adverts = {n: m.signed_advert() for n, m in small.items()}
    with pytest.raises(ProtocolRefused, match="cannot hold shares at the study's threshold 3"):
        small["a"].accept_cohort(adverts)
    strangers = {
        n: SecAggMember(n, CTX, signatures(pki, n), ROSTER, 3, key.params.plain_modulus)
        for n in ("a", "c", "e")
    }
    adverts = {n: m.signed_advert() for n, m in strangers.items()}
    with pytest.raises(ProtocolRefused, match=r"names \['e'\], not sites of the approved study"):
        strangers["a"].accept_cohort(adverts)


def test_a_substituted_key_or_share_is_refused_naming_the_peer(pki: Path, key: HospitalKey) -> None:
    ms = members(pki, key)
    adverts = {n: m.signed_advert() for n, m in ms.items()}
    forged = dict(adverts)
    mallory = SecAggMember("b", CTX, Signatures(None, None), ROSTER, 3, key.params.plain_modulus)
    forged["b"] = dataclasses.replace(adverts["b"], public_key=mallory.advert.to_bytes())
    with pytest.raises(ProtocolRefused, match="the advertisement of b is refused"):
        ms["a"].accept_cohort(forged)
    for m in ms.values():
        m.accept_cohort(adverts)
    boxes = {n: m.share_boxes() for n, m in ms.items()}
    to_a = {s: b["a"] for s, b in boxes.items() if "a" in b}
    to_a["c"] = boxes["c"]["b"]  # c's box for b, relayed to a as c's box for a
    ms["a"].accept_shares(frozenset(NAMES), to_a)
    # Refused, named, and never used: a holds no share of c; c's other holders do.
    assert "shares of c do not open" in ms["a"].refused_boxes["c"]
    for n in ("b", "c", "d"):
        ms[n].accept_shares(frozenset(NAMES), {s: b[n] for s, b in boxes.items() if n in b})
    u3 = frozenset(NAMES)
    signed = {n: ms[n].sign_survivors(u3) for n in NAMES}
    payload, _ = ms["a"].reveal(u3, signed)
    assert "c" not in {owner for owner, _, _ in decode_reveal(payload, "a")}


def test_a_forged_reveal_or_unsigned_survivor_set_is_refused(pki: Path, key: HospitalKey) -> None:
    played = play(pki, key, frozenset({"d"}))
    t = played.transcript
    n_slots = slot_count(ChunkKind.WEIGHTED_UPDATE, N_VALUES, key.params)
    checker = signatures(pki, "a")

    def correction(transcript: RoundTranscript) -> np.ndarray:
        return unmask_correction(CTX, transcript, checker, ROSTER, 3, n_slots, key.params.plain_modulus)

    payload, signed = t.reveals["b"]
    tampered = payload[:-1] + bytes([payload[-1] ^ 1])
    with pytest.raises(ProtocolRefused, match="the reveal of b is refused"):
        correction(dataclasses.replace(t, reveals={**t.reveals, "b": (tampered, signed)}))
    with pytest.raises(ProtocolRefused, match="survivors signed the survivor set"):
        correction(dataclasses.replace(t, survivor_signatures={"a": t.survivor_signatures["a"]}))
    with pytest.raises(ProtocolRefused, match="survivor sets are not nested"):
        correction(dataclasses.replace(t, u2=frozenset({"a", "b"})))
    unsigned = {n: Signed() for n in t.survivor_signatures}
    with pytest.raises(ProtocolRefused):
        correction(dataclasses.replace(t, survivor_signatures=unsigned))


def test_shamir_threshold_and_sparse_graph() -> None:
    secret = bytes(range(32))
    shares = split(secret, [1, 2, 3, 4, 5], 3)
    assert combine([shares[1], shares[4], shares[5]]) == secret
    with pytest.raises(ShareError):  # two shares: a constant of the whole field, not the secret
        assert combine([shares[2], shares[3]]) != secret
    assert (
        all(0 <= s.y < PRIME for s in shares.values()) and Share.from_bytes(shares[2].to_bytes()) == shares[2]
    )
    names = [f"h{i:03d}" for i in range(128)]
    g = graphs.neighbours(names, b"seed")
    k = graphs.degree(128)
    assert k < 64 and all(len(p) == k for p in g.values())
    assert all(m in g[p] for m, ps in g.items() for p in ps)  # symmetric
    assert graphs.neighbours(names, b"other") != g  # the seed (the cohort's digest) decides it
    assert all(len(p) == 3 for p in graphs.neighbours(list(NAMES), b"s").values())
