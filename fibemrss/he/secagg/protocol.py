"""Secure aggregation against an actively lying aggregator: one hospital's part of one round.

Double masking after Bonawitz et al. (CCS 2017), with the sparse graph of SecAgg+ (Bell et al.,
CCS 2020) for large cohorts (`graph.py`), inside the HE plaintexts: the aggregator adds BFV
ciphertexts it cannot read, and the masks keep any one upload unreadable to whoever holds the HE
secret key (every hospital) unless the whole protocol says it may be unmasked. Stages, each
message signed with the sender's site key and bound to (federation, study hash, round) and,
after the first, to the cohort (the digest of every member's signed advertisement):

1. advertise: two X25519 public keys (c: share encryption, s: pairwise masks) and a SHA-256
   commitment to a fresh self-mask seed b. The aggregator fixes the cohort U1 from them; each
   member checks U1 (only sites of the study, at least `min_contributors`, every advertisement
   signed by its own site, its own unchanged) before anything else.
2. share: t-of-h Shamir shares of b and of the s private key go to each neighbour, encrypted and
   authenticated under a key agreed with that neighbour (AES-256-GCM); the senders are U2.
3. upload: x + PRG(b) + sum over neighbours j in U2 of +-PRG(s_ij), modulo the plain modulus,
   encrypted; the upload is signed over the digests of its chunks. The uploaders are U3. Exactly
   one upload per round: the keys and seed live in this process only, so a restarted agent
   cannot take part again in the same round, and nobody re-sends an update.
4. consistency: each survivor signs U3 as it was shown it, once; it refuses any other U3 later.
5. unmask: only after at least its threshold of valid signatures on that same U3, a survivor
   reveals, for each member whose shares it holds, the b share if the member is in U3 or the s
   share if it dropped: never both for one member.

Any hospital then checks the aggregate against the signed uploads and removes the masks itself
(`unmask_correction`): every reconstructed secret is checked against its signed advertisement
(the b commitment, the s public key), so a substituted share is detected, not used.
Pure: no I/O; randomness from the OS.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fibemrss.he.errors import HeKeyError
from fibemrss.he.mask_signatures import MaskKeyRefused, MaskKeySigner, MaskKeyVerifier, SignedMaskKey
from fibemrss.he.masking import MaskKeyPair, expand_mask
from fibemrss.he.secagg import graph as graphs
from fibemrss.he.secagg.shamir import Share, ShareError, combine, split

ADVERT_BYTES = 96
_SHARE_WIRE = 4 + 66
_MAX_COMBINATIONS = 256


class ProtocolRefused(HeKeyError):
    """A protocol step this hospital refuses; the message names the peer or the aggregator's lie."""


@dataclass(frozen=True)
class RoundContext:
    """What every message of a round is bound to."""

    federation_id: bytes
    task: str
    study_hash: str
    round: int

    def digest(self, domain: bytes, *parts: bytes) -> bytes:
        h = hashlib.sha256()
        for part in (domain, self.federation_id, self.task.encode(), self.study_hash.encode(), *parts):
            h.update(len(part).to_bytes(4, "little") + part)
        h.update(self.round.to_bytes(8, "little", signed=True))
        return domain + b"|" + h.digest()


@dataclass(frozen=True)
class Advertisement:
    share_key: bytes  # X25519 public key: encrypts the shares sent to this member
    mask_key: bytes  # X25519 public key: pairwise masks
    seed_commitment: bytes  # SHA-256 of the self-mask seed

    def to_bytes(self) -> bytes:
        return self.share_key + self.mask_key + self.seed_commitment

    @staticmethod
    def from_bytes(data: bytes, owner: str) -> Advertisement:
        if len(data) != ADVERT_BYTES:
            raise ProtocolRefused(f"the advertisement of {owner} is {len(data)} bytes, not {ADVERT_BYTES}")
        return Advertisement(data[:32], data[32:64], data[64:])


def advert_statement(ctx: RoundContext, hospital: str, advert: bytes) -> bytes:
    return ctx.digest(b"fibemrss-secagg-advert-v1", hospital.encode(), advert)


def cohort_digest(adverts: Mapping[str, bytes]) -> bytes:
    """The cohort U1 and every member's advertisement, in one digest (the graph's seed too)."""
    h = hashlib.sha256(b"fibemrss-secagg-cohort-v1")
    for name in sorted(adverts):
        for part in (name.encode(), adverts[name]):
            h.update(len(part).to_bytes(4, "little") + part)
    return h.digest()


def names_digest(names: Iterable[str]) -> bytes:
    h = hashlib.sha256(b"fibemrss-secagg-names-v1")
    for name in sorted(set(names)):
        h.update(len(name).to_bytes(4, "little") + name.encode())
    return h.digest()


def upload_statement(ctx: RoundContext, cohort: bytes, hospital: str, chunks: Sequence[bytes]) -> bytes:
    return ctx.digest(
        b"fibemrss-secagg-upload-v1",
        cohort,
        hospital.encode(),
        len(chunks).to_bytes(4, "little"),
        *(hashlib.sha256(c).digest() for c in chunks),
    )


def chunk_digests_statement(
    ctx: RoundContext, cohort: bytes, hospital: str, digests: Sequence[bytes]
) -> bytes:
    """`upload_statement` from the chunks' SHA-256 digests (a verifier that samples chunks)."""
    return ctx.digest(
        b"fibemrss-secagg-upload-v1", cohort, hospital.encode(), len(digests).to_bytes(4, "little"), *digests
    )


def survivors_statement(ctx: RoundContext, cohort: bytes, survivors: Iterable[str]) -> bytes:
    return ctx.digest(b"fibemrss-secagg-survivors-v1", cohort, names_digest(survivors))


def reveal_statement(
    ctx: RoundContext, cohort: bytes, survivors: Iterable[str], hospital: str, payload: bytes
) -> bytes:
    return ctx.digest(
        b"fibemrss-secagg-reveal-v1", cohort, names_digest(survivors), hospital.encode(), payload
    )


@dataclass(frozen=True)
class Signed:
    """A protocol message's signature and the signer's certificate (both empty without TLS)."""

    signature: bytes = b""
    certificate: bytes = b""


class Signatures:
    """Signs with this site's key and checks peers' against the federation CA; without TLS
    (loopback tests, benchmarks without a PKI) nothing is signed or checked."""

    def __init__(self, signer: MaskKeySigner | None, verifier: MaskKeyVerifier | None) -> None:
        if (signer is None) != (verifier is None):
            raise ValueError("protocol messages are signed and checked together, or neither (no TLS)")
        self._signer, self._verifier = signer, verifier

    @property
    def enabled(self) -> bool:
        return self._signer is not None

    def sign(self, message: bytes) -> Signed:
        if self._signer is None:
            return Signed()
        return Signed(self._signer.sign_message(message), self._signer.certificate)

    def check(self, hospital: str, message: bytes, signed: Signed, what: str) -> None:
        if self._verifier is None:
            return
        try:
            self._verifier.check_message(hospital, message, signed.signature, signed.certificate)
        except MaskKeyRefused as refused:
            raise ProtocolRefused(f"{what} of {hospital} is refused: {refused}") from None

    def valid(self, hospital: str, message: bytes, signed: Signed) -> bool:
        try:
            self.check(hospital, message, signed, "")
        except ProtocolRefused:
            return False
        return True


@dataclass(frozen=True)
class CohortView:
    """The checked cohort U1 of a round: advertisements, neighbour graph, thresholds."""

    adverts: Mapping[str, Advertisement]
    digest: bytes
    graph: Mapping[str, frozenset[str]]
    roster_size: int | None

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self.adverts)

    def holders(self, member: str) -> frozenset[str]:
        return self.graph[member] | {member}

    def threshold(self, member: str) -> int:
        return graphs.member_threshold(member, self.graph, self.roster_size)


def check_cohort(
    ctx: RoundContext,
    signed_adverts: Mapping[str, SignedMaskKey],
    signatures: Signatures,
    roster: frozenset[str] | None,
    min_contributors: int,
    roster_size: int | None = None,
    for_member: str | None = None,
) -> CohortView:
    """The cohort as the aggregator showed it, checked: only roster sites, at least
    min_contributors (and enough holders for every member's threshold), every advertisement
    signed by its own site for this round. With `for_member`, only the advertisements that
    member uses (its holders': their keys are the only ones it agrees on) are verified, so its
    work grows with its neighbours, not the cohort; the cohort digest still covers them all."""
    names = frozenset(signed_adverts)
    if roster is not None and not names <= roster:
        raise ProtocolRefused(
            f"round {ctx.round}: the cohort names {sorted(names - roster)}, not sites of the approved study"
        )
    if len(names) < min_contributors:
        raise ProtocolRefused(
            f"round {ctx.round}: a cohort of {len(names)} is below the study's minimum of {min_contributors}"
        )
    adverts = {n: Advertisement.from_bytes(k.public_key, n) for n, k in sorted(signed_adverts.items())}
    digest = cohort_digest({n: a.to_bytes() for n, a in adverts.items()})
    view = CohortView(
        adverts,
        digest,
        graphs.neighbours(sorted(names), digest),
        roster_size if roster_size is not None else (None if roster is None else len(roster)),
    )
    checked = names if for_member is None or for_member not in names else view.holders(for_member)
    for name in sorted(checked):
        signed = signed_adverts[name]
        signatures.check(
            name,
            advert_statement(ctx, name, signed.public_key),
            Signed(signed.signature, signed.certificate),
            "the advertisement",
        )
    for name in names:
        if view.threshold(name) > len(view.holders(name)):
            raise ProtocolRefused(
                f"round {ctx.round}: a cohort of {len(names)} cannot hold shares at the study's threshold "
                f"{view.threshold(name)} (roster of {view.roster_size})"
            )
    return view


def _box_key(
    own: X25519PrivateKey, peer_public: bytes, ctx: RoundContext, cohort: bytes, sender: str, recipient: str
) -> AESGCM:
    try:
        secret = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise ProtocolRefused(
            f"the share key of {recipient if sender else sender} is invalid: {error}"
        ) from None
    low, high = sorted((sender, recipient))
    info = ctx.digest(b"fibemrss-secagg-box-v1", cohort, low.encode(), high.encode())
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret))


def _pairwise_sign(own: str, peer: str) -> int:
    return 1 if own < peer else -1


def _fold(total: np.ndarray, modulus: int) -> None:
    np.subtract(total, modulus, out=total, where=total >= modulus)
    np.add(total, modulus, out=total, where=total < 0)


def _pair_seed(own: MaskKeyPair, peer_key: bytes, ctx: RoundContext, own_name: str, peer: str) -> bytes:
    low, high = sorted((own_name, peer))
    try:
        secret = own.shared_secret(peer_key)
    except HeKeyError as error:
        raise ProtocolRefused(f"the mask key of {peer} is invalid: {error}") from None
    info = ctx.digest(b"fibemrss-secagg-pair-v1", low.encode(), high.encode())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def self_mask(seed: bytes, n_slots: int, modulus: int) -> np.ndarray:
    return expand_mask(hashlib.sha256(b"fibemrss-secagg-self-v1" + seed).digest(), n_slots, modulus)


def _commit(seed: bytes) -> bytes:
    return hashlib.sha256(b"fibemrss-secagg-commit-v1" + seed).digest()


@dataclass
class _Held:
    self_seed: dict[str, Share] = field(default_factory=dict)  # owner -> share of its b
    mask_secret: dict[str, Share] = field(default_factory=dict)  # owner -> share of its s key


class SecAggMember:
    """One hospital's part of one round, as a state machine: each method is one stage and
    refuses to run out of order or twice with a different view."""

    def __init__(
        self,
        hospital: str,
        ctx: RoundContext,
        signatures: Signatures,
        roster: frozenset[str] | None,
        min_contributors: int,
        modulus: int,
        roster_size: int | None = None,
    ) -> None:
        """`roster`: the sites the approved study lists (None: any); `roster_size`: the number of
        sites the threshold is fixed over (default: the roster's), so an aggregator cannot lower
        it by showing a smaller cohort."""
        self.hospital = hospital
        self.ctx = ctx
        self._sig = signatures
        self._roster = roster
        self._roster_size = roster_size
        self._min = min_contributors
        self._modulus = modulus
        self._share_key = X25519PrivateKey.generate()
        self._mask_secret = os.urandom(32)
        self._mask_pair = MaskKeyPair(self._mask_secret)
        self._seed = os.urandom(32)
        self.advert = Advertisement(
            self._share_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
            self._mask_pair.public_key,
            _commit(self._seed),
        )
        self.cohort: CohortView | None = None
        self.u2: frozenset[str] | None = None
        self.u3: frozenset[str] | None = None
        self._held = _Held()
        self.revealed = False
        # The survivor signature and the reveal, each made once: a retry after a lost answer posts
        # these very messages again (signatures are randomized: a second one would be a second,
        # different message in the stage, refused by the aggregator).
        self._survivors_signed: Signed | None = None
        self.reveal_message: tuple[bytes, Signed] | None = None
        # Peers whose shares this hospital could not use, and why (reported, never fatal).
        self.refused_boxes: dict[str, str] = {}
        self._boxes: dict[str, bytes] | None = None
        # This hospital's one upload to the round once made: (chunks, signature, epsilon).
        self.upload: tuple[list[bytes], Signed, float] | None = None

    # 1. advertise -------------------------------------------------------------------------------
    def signed_advert(self) -> SignedMaskKey:
        data = self.advert.to_bytes()
        signed = self._sig.sign(advert_statement(self.ctx, self.hospital, data))
        return SignedMaskKey(data, signed.signature, signed.certificate)

    def accept_cohort(self, signed_adverts: Mapping[str, SignedMaskKey]) -> CohortView:
        if self.cohort is not None:
            if cohort_digest({n: k.public_key for n, k in signed_adverts.items()}) != self.cohort.digest:
                raise ProtocolRefused(
                    f"round {self.ctx.round}: the aggregator showed a second, different cohort"
                )
            return self.cohort
        own = signed_adverts.get(self.hospital)
        if own is None or own.public_key != self.advert.to_bytes():
            raise ProtocolRefused(
                f"round {self.ctx.round}: the cohort does not hold this hospital's advertisement of this process"
            )
        self.cohort = check_cohort(
            self.ctx, signed_adverts, self._sig, self._roster, self._min, self._roster_size, self.hospital
        )
        return self.cohort

    # 2. share -------------------------------------------------------------------------------------
    def share_boxes(self) -> dict[str, bytes]:
        """The encrypted shares for each neighbour (this hospital keeps its own share); the same
        boxes on every call, so a message re-sent after a lost answer is the identical one."""
        if self._boxes is None:
            self._boxes = self._make_boxes()
        return dict(self._boxes)

    def _make_boxes(self) -> dict[str, bytes]:
        view = self._need_cohort()
        holders = sorted(view.holders(self.hospital))
        index = graphs.holder_index(view.members)
        t = view.threshold(self.hospital)
        xs = [index[h] for h in holders]
        b_shares = split(self._seed, xs, t)
        s_shares = split(self._mask_secret, xs, t)
        own_x = index[self.hospital]
        self._held.self_seed[self.hospital] = b_shares[own_x]
        self._held.mask_secret[self.hospital] = s_shares[own_x]
        boxes = {}
        for peer in holders:
            if peer == self.hospital:
                continue
            aead = _box_key(
                self._share_key, view.adverts[peer].share_key, self.ctx, view.digest, self.hospital, peer
            )
            nonce = os.urandom(12)
            plain = b_shares[index[peer]].to_bytes() + s_shares[index[peer]].to_bytes()
            boxes[peer] = nonce + aead.encrypt(nonce, plain, f"{self.hospital}>{peer}".encode())
        return boxes

    def accept_shares(self, u2: Iterable[str], boxes: Mapping[str, bytes]) -> None:
        """U2 as the aggregator closed it and the boxes addressed to this hospital."""
        view = self._need_cohort()
        survivors = frozenset(u2)
        if self.u2 is not None:
            if survivors != self.u2:
                raise ProtocolRefused(f"round {self.ctx.round}: the aggregator showed a second, different U2")
            return
        if not survivors <= view.members or self.hospital not in survivors:
            raise ProtocolRefused(
                f"round {self.ctx.round}: the members who shared are not a part of the cohort with this hospital"
            )
        if len(survivors) < self._min:
            raise ProtocolRefused(
                f"round {self.ctx.round}: only {len(survivors)} members shared, below the minimum {self._min}"
            )
        index = graphs.holder_index(view.members)
        for peer in sorted(view.graph[self.hospital] & survivors):
            problem = self._open_box(view, index, peer, boxes.get(peer))
            if problem:
                # A hostile peer (or a relay that swapped its box) cannot stop the round: this
                # hospital holds no share of that peer, the peer's other holders do.
                self.refused_boxes[peer] = problem
        self.u2 = survivors

    def _open_box(self, view: CohortView, index: Mapping[str, int], peer: str, box: bytes | None) -> str:
        """Stores the shares `peer` sent this hospital; the reason when they are unusable."""
        if box is None or len(box) < 12:
            return f"round {self.ctx.round}: the shares of {peer} are missing"
        aead = _box_key(
            self._share_key, view.adverts[peer].share_key, self.ctx, view.digest, peer, self.hospital
        )
        try:
            plain = aead.decrypt(box[:12], box[12:], f"{peer}>{self.hospital}".encode())
        except InvalidTag:
            return f"round {self.ctx.round}: the shares of {peer} do not open (substituted or corrupted on the way)"
        try:
            b, s = Share.from_bytes(plain[:_SHARE_WIRE]), Share.from_bytes(plain[_SHARE_WIRE:])
        except ShareError as error:
            return f"round {self.ctx.round}: the shares of {peer} are malformed: {error}"
        if b.x != index[self.hospital] or s.x != index[self.hospital]:
            return f"round {self.ctx.round}: {peer} sent shares for another holder"
        self._held.self_seed[peer] = b
        self._held.mask_secret[peer] = s
        return ""

    # 3. upload -------------------------------------------------------------------------------------
    def mask(self, n_slots: int) -> np.ndarray:
        """PRG(b) plus the pairwise masks with every neighbour that shared (mod the plain modulus)."""
        view = self._need_cohort()
        if self.u2 is None:
            raise ProtocolRefused("the mask is made only after the share stage")
        total = self_mask(self._seed, n_slots, self._modulus)
        for peer in sorted(view.graph[self.hospital] & self.u2):
            seed = _pair_seed(self._mask_pair, view.adverts[peer].mask_key, self.ctx, self.hospital, peer)
            pair = expand_mask(seed, n_slots, self._modulus)
            total += pair if _pairwise_sign(self.hospital, peer) > 0 else -pair
            _fold(total, self._modulus)
        return total

    def sign_upload(self, chunks: Sequence[bytes]) -> Signed:
        view = self._need_cohort()
        return self._sig.sign(upload_statement(self.ctx, view.digest, self.hospital, chunks))

    # 4. consistency ------------------------------------------------------------------------------------
    def sign_survivors(self, u3: Iterable[str]) -> Signed:
        """Signs the survivor set U3 as shown, once per round: a different U3 later is refused."""
        view = self._need_cohort()
        survivors = frozenset(u3)
        if self.u3 is not None and survivors != self.u3:
            raise ProtocolRefused(
                f"round {self.ctx.round}: the aggregator showed a second, different survivor set "
                f"({sorted(survivors)} after {sorted(self.u3)}); refusing"
            )
        if self.u2 is None or not survivors <= self.u2 or self.hospital not in survivors:
            raise ProtocolRefused(
                f"round {self.ctx.round}: the survivor set is not a part of the members who shared"
            )
        if len(survivors) < self._min:
            raise ProtocolRefused(
                f"round {self.ctx.round}: {len(survivors)} survivors are below the study's minimum of {self._min}"
            )
        if self._survivors_signed is None:
            self.u3 = survivors
            self._survivors_signed = self._sig.sign(survivors_statement(self.ctx, view.digest, survivors))
        return self._survivors_signed

    # 5. unmask ------------------------------------------------------------------------------------------
    def reveal(self, u3: Iterable[str], survivor_signatures: Mapping[str, Signed]) -> tuple[bytes, Signed]:
        """The shares this hospital reveals for the survivor set it signed, once enough of its
        holders signed the same set: b shares of survivors, s shares of members that dropped."""
        view = self._need_cohort()
        survivors = frozenset(u3)
        if self.u3 is None or survivors != self.u3:
            raise ProtocolRefused(
                f"round {self.ctx.round}: asked to reveal for a survivor set this hospital did not sign; refusing"
            )
        if self.reveal_message is not None:
            return self.reveal_message
        if self.revealed is False:
            statement = survivors_statement(self.ctx, view.digest, survivors)
            # Only its holders' signatures count for this member: verify those alone.
            agreeing = {
                name
                for name, signed in survivor_signatures.items()
                if name in survivors
                and (name in view.holders(self.hospital) or not self._sig.enabled)
                and self._sig.valid(name, statement, signed)
            }
            agreeing.add(self.hospital)
            t = view.threshold(self.hospital)
            if len(agreeing) < t:
                raise ProtocolRefused(
                    f"round {self.ctx.round}: only {len(agreeing)} members signed the survivor set, "
                    f"fewer than the threshold {t}; revealing nothing"
                )
        assert self.u2 is not None
        entries = []
        for owner in sorted(view.holders(self.hospital) & self.u2):
            if owner not in self._held.self_seed:
                continue  # its shares never reached this hospital intact
            if owner in survivors:
                entries.append((owner, b"b", self._held.self_seed[owner]))
            else:
                entries.append((owner, b"s", self._held.mask_secret[owner]))
        payload = encode_reveal(entries)
        self.revealed = True
        self.reveal_message = (
            payload,
            self._sig.sign(reveal_statement(self.ctx, view.digest, survivors, self.hospital, payload)),
        )
        return self.reveal_message

    def _need_cohort(self) -> CohortView:
        if self.cohort is None:
            raise ProtocolRefused("the cohort has not been checked yet")
        return self.cohort


def encode_reveal(entries: Sequence[tuple[str, bytes, Share]]) -> bytes:
    out = bytearray()
    for owner, kind, share in entries:
        name = owner.encode()
        out += len(name).to_bytes(2, "little") + name + kind + share.to_bytes()
    return bytes(out)


def decode_reveal(payload: bytes, revealer: str) -> list[tuple[str, bytes, Share]]:
    entries = []
    at = 0
    try:
        while at < len(payload):
            size = int.from_bytes(payload[at : at + 2], "little")
            name = payload[at + 2 : at + 2 + size].decode()
            at += 2 + size
            kind = payload[at : at + 1]
            share = Share.from_bytes(payload[at + 1 : at + 1 + _SHARE_WIRE])
            at += 1 + _SHARE_WIRE
            if kind not in (b"b", b"s"):
                raise ShareError("unknown share kind")
            entries.append((name, kind, share))
    except (ShareError, UnicodeDecodeError) as error:
        raise ProtocolRefused(f"the revealed shares of {revealer} are malformed: {error}") from None
    return entries


@dataclass(frozen=True)
class RoundTranscript:
    """What the aggregator relays of a finished round, for any hospital to check and unmask."""

    adverts: Mapping[str, SignedMaskKey]
    u2: frozenset[str]
    u3: frozenset[str]
    survivor_signatures: Mapping[str, Signed]
    reveals: Mapping[str, tuple[bytes, Signed]]


def _recover(shares: list[Share], t: int, check: Callable[[bytes], bool], owner: str, what: str) -> bytes:
    if len(shares) < t:
        raise ProtocolRefused(
            f"only {len(shares)} shares of the {what} of {owner} were revealed, {t} are needed"
        )
    for n, subset in enumerate(itertools.combinations(shares, t)):
        if n >= _MAX_COMBINATIONS:
            break
        try:
            secret = combine(subset)
        except ShareError:
            continue
        if check(secret):
            return secret
    raise ProtocolRefused(
        f"the revealed shares of the {what} of {owner} do not match its signed advertisement"
    )


def unmask_correction(
    ctx: RoundContext,
    transcript: RoundTranscript,
    signatures: Signatures,
    roster: frozenset[str] | None,
    min_contributors: int,
    n_slots: int,
    modulus: int,
    roster_size: int | None = None,
) -> np.ndarray:
    """The masks left in the sum of U3's uploads, to subtract after decryption, from the signed
    transcript alone: checks the cohort, that at least the threshold of survivors signed U3, every
    reveal's signature, that no revealer gave both shares of one member, and each recovered secret
    against its advertisement. Refuses (ProtocolRefused) otherwise."""
    view = check_cohort(ctx, transcript.adverts, signatures, roster, min_contributors, roster_size)
    u2, u3 = transcript.u2, transcript.u3
    if not u3 <= u2 <= view.members or len(u3) < min_contributors:
        raise ProtocolRefused(f"round {ctx.round}: the survivor sets are not nested in the cohort")
    statement = survivors_statement(ctx, view.digest, u3)
    signers = {
        n for n, s in transcript.survivor_signatures.items() if n in u3 and signatures.valid(n, statement, s)
    }
    if signatures.enabled and len(signers) < min(view.threshold(m) for m in u3):
        raise ProtocolRefused(f"round {ctx.round}: only {len(signers)} survivors signed the survivor set")
    shares: dict[tuple[str, bytes], list[Share]] = {}
    for revealer, (payload, signed) in sorted(transcript.reveals.items()):
        if revealer not in u3:
            continue
        signatures.check(
            revealer, reveal_statement(ctx, view.digest, u3, revealer, payload), signed, "the reveal"
        )
        for owner, kind, share in decode_reveal(payload, revealer):
            if owner not in view.holders(revealer) or owner not in u2:
                raise ProtocolRefused(f"{revealer} revealed a share of {owner}, which it does not hold")
            if (kind == b"b") != (owner in u3):
                raise ProtocolRefused(f"{revealer} revealed the wrong kind of share of {owner}")
            shares.setdefault((owner, kind), []).append(share)
    correction = np.zeros(n_slots, dtype=np.int64)
    for owner in sorted(u3):
        commitment = view.adverts[owner].seed_commitment

        def seed_matches(secret: bytes, commitment: bytes = commitment) -> bool:
            return _commit(secret) == commitment

        seed = _recover(
            shares.get((owner, b"b"), []), view.threshold(owner), seed_matches, owner, "self-mask seed"
        )
        correction += self_mask(seed, n_slots, modulus)
        _fold(correction, modulus)
    for dropped in sorted(u2 - u3):
        mask_key = view.adverts[dropped].mask_key

        def key_matches(secret: bytes, mask_key: bytes = mask_key) -> bool:
            return MaskKeyPair(secret).public_key == mask_key

        secret = _recover(
            shares.get((dropped, b"s"), []), view.threshold(dropped), key_matches, dropped, "mask key"
        )
        pair = MaskKeyPair(secret)
        for survivor in sorted(view.graph[dropped] & u3):
            seed = _pair_seed(pair, view.adverts[survivor].mask_key, ctx, dropped, survivor)
            mask = expand_mask(seed, n_slots, modulus)
            # the survivor added sign(survivor, dropped) * m: take it away with the rest
            correction += mask if _pairwise_sign(survivor, dropped) > 0 else -mask
            _fold(correction, modulus)
    return correction
