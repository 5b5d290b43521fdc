"""BFV parameters of the codec, their bounds, and the checks that make those bounds hold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Largest total coefficient-modulus bit count that is 128-bit secure for a ternary secret, per the
# HomomorphicEncryption.org security standard (Albrecht et al., 2018, table "uniform/ternary, 128").
HE_STANDARD_MAX_LOG_Q_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

# SEAL draws every fresh error coefficient from a centered binomial distribution (sigma 3.2) whose
# support is [-21, 21]; its clipped-normal alternative clips at 6 sigma = 19.2. 21 bounds both.
SEAL_FRESH_NOISE_BOUND = 21

# Several data primes are recombined (CRT) in 64-bit integer arithmetic: every product of two
# residues must stay below 2^63, so each prime of a multi-prime data modulus stays below 2^31.
MAX_RNS_PRIME_BITS = 31

# Key files written before the packed codec carry no such fields: one value per slot, nothing dropped.
_LEGACY_FIELDS = {"values_per_slot": 1, "c0_dropped_bits": 0}


@dataclass(frozen=True)
class HeParams:
    """Everything both sides must agree on; it travels inside every key file.

    Encoding: a value v of a model update with weight w becomes the integer round(w * v * 2^frac_bits);
    slot 0 of an update carries w itself, so the aggregator adds dataset sizes without seeing them.
    `values_per_slot` (k) such integers share one BFV slot as the digits of one number in base
    `digit_base` (T, odd, T^k <= t), each digit centered in [-(T-1)/2, (T-1)/2]: the cohort's sum of
    every digit must stay in that range, which is what `party_magnitude_bound` guarantees. An upload
    sends c0 without its `c0_dropped_bits` lowest bits (and c1 as SEAL's 64-byte seed).
    """

    scheme: str = "BFV"
    poly_modulus_degree: int = 4096
    # Three 24-bit data primes (q ~ 2^72, where ciphertexts live) and SEAL's special prime last
    # (used only by key switching, which additive aggregation never does): 96 bits <= 109.
    coeff_mod_bit_sizes: tuple[int, ...] = (24, 24, 24, 24)
    # The smallest prime = 1 mod 2N above (2^26 + 1)^2: two digits of base T = 2^26 + 1 per slot.
    plain_modulus: int = 4_503_599_761_883_137
    frac_bits: int = 5
    stats_frac_bits: int = 8
    # 128 hospitals' sum in a digit (one party 2^10 x 2^3 x 2^5 = 2^18, 128 of them 2^25 = (T-1)/2).
    max_parties: int = 128
    max_weight: int = 2**10
    max_abs_value: float = 2.0**3
    # 32 ciphertexts: 262,144 values, about 0.97 MB uploaded and 2.5 MB aggregated, under gRPC's 4 MiB.
    ciphertexts_per_chunk: int = 32
    values_per_slot: int = 2
    # c0 rounded to a multiple of 2^12 before it is sent (60 of its 72 bits): the noise of 128 uploads
    # stays below q / (2t) with the margin 64 had at 2^13 (docs/he-codec.md).
    c0_dropped_bits: int = 12

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid HE parameters: " + "; ".join(problems))

    @property
    def slots_per_ciphertext(self) -> int:
        return self.poly_modulus_degree

    @property
    def values_per_ciphertext(self) -> int:
        return self.poly_modulus_degree * self.values_per_slot

    @property
    def slots_per_chunk(self) -> int:
        return self.poly_modulus_degree * self.ciphertexts_per_chunk

    @property
    def data_prime_count(self) -> int:
        """SEAL keeps its last prime for key switching when there are several: ciphertexts live
        modulo the others."""
        return max(1, len(self.coeff_mod_bit_sizes) - 1)

    @property
    def digit_base(self) -> int:
        """T: the largest odd integer with T^values_per_slot <= t (t itself for one value per slot)."""
        if self.values_per_slot == 1:
            return self.plain_modulus
        base = _integer_root(self.plain_modulus, self.values_per_slot)
        return base if base % 2 == 1 else base - 1

    @property
    def party_magnitude_bound(self) -> int:
        """Largest |encoded integer| one party may put in a digit so that max_parties of them still
        decode without wrapping: every digit's sum must stay in [-(T-1)/2, (T-1)/2]."""
        return (self.digit_base - 1) // 2 // self.max_parties

    @property
    def average_error_bound(self) -> float:
        """Worst absolute error of a decrypted weighted average when every weight is 1: each party
        rounds w*v*2^f once (error <= 1/2). See `average_error` for a known total weight."""
        return 0.5 / 2**self.frac_bits

    def average_error(self, parties: int, total_weight: int) -> float:
        """Worst absolute error of an average of `parties` uploads of total weight `total_weight`:
        the parties' roundings (<= 1/2 each) divided by 2^frac_bits x the total weight."""
        return 0.5 * parties / (2**self.frac_bits * max(total_weight, 1))

    def max_abs_sum_value(self, frac_bits: int) -> float:
        """Largest |value| one party may pass to encrypt_sums at the given fractional bits."""
        return self.party_magnitude_bound / 2**frac_bits

    def noise_bound(self) -> float:
        """Worst |noise| of a sum of max_parties uploads: per party SEAL's fresh noise (21), the
        rounding of round(q m / t) (1/2) and the dropped bits of c0 (2^(d-1))."""
        dropped = 2 ** (self.c0_dropped_bits - 1) if self.c0_dropped_bits else 0
        return self.max_parties * (SEAL_FRESH_NOISE_BOUND + 0.5 + dropped)

    def noise_problems(self, data_primes: Sequence[int]) -> list[str]:
        """The exactness rule against the actual primes SEAL chose: the noise of max_parties
        uploads must stay below q / (2t), where decryption rounds; empty when it does."""
        q = math.prod(data_primes)
        found = []
        if self.noise_bound() >= q / (2 * self.plain_modulus):
            found.append(
                f"noise of {self.max_parties} uploads ({self.noise_bound():.0f}) may reach q / (2t) = "
                f"{q / (2 * self.plain_modulus):.0f}: lower c0_dropped_bits or max_parties"
            )
        if len(data_primes) > 1 and max(data_primes).bit_length() > MAX_RNS_PRIME_BITS:
            found.append(f"each of several data primes must have at most {MAX_RNS_PRIME_BITS} bits")
        return found

    def coefficient_bits(self, data_primes: Sequence[int]) -> int:
        """Bits of one coefficient of c0 as uploaded: q - 1 without its dropped bits."""
        return ((math.prod(data_primes) - 1) >> self.c0_dropped_bits).bit_length()

    def problems(self) -> list[str]:
        """Every violated rule, in words; empty when the parameters are secure and exact. The noise
        rule needs SEAL's primes: `noise_problems`, checked when a SEAL context is built."""
        found: list[str] = []
        n = self.poly_modulus_degree
        if self.scheme != "BFV":
            found.append(f"scheme must be BFV, not {self.scheme!r}")
        if n not in HE_STANDARD_MAX_LOG_Q_128:
            found.append(f"poly_modulus_degree {n} is not in the HE standard table")
            return found
        log_q = sum(self.coeff_mod_bit_sizes)
        if not self.coeff_mod_bit_sizes or log_q > HE_STANDARD_MAX_LOG_Q_128[n]:
            found.append(
                f"log q = {log_q} exceeds {HE_STANDARD_MAX_LOG_Q_128[n]}, the 128-bit bound for N={n}"
            )
        if any(not 20 <= bits <= 60 for bits in self.coeff_mod_bit_sizes):
            found.append("each coefficient prime must have 20 to 60 bits (SEAL)")
        if len(self.coeff_mod_bit_sizes) > 1 and any(
            bits > MAX_RNS_PRIME_BITS for bits in self.coeff_mod_bit_sizes[:-1]
        ):
            found.append(f"each of several data primes must have at most {MAX_RNS_PRIME_BITS} bits")
        if self.plain_modulus % (2 * n) != 1 or self.plain_modulus >= 2**60:
            found.append("plain_modulus must be a prime below 2^60 that is 1 mod 2N (batching)")
        if self.values_per_slot not in (1, 2, 3):
            found.append("values_per_slot must be 1, 2 or 3")
            return found
        if not 0 <= self.c0_dropped_bits <= 32:
            found.append("c0_dropped_bits must lie in [0, 32]")
        if self.max_parties < 1 or self.max_weight < 1 or self.max_abs_value <= 0:
            found.append("max_parties, max_weight and max_abs_value must be positive")
            return found
        if not 0 <= self.frac_bits <= 40 or not 0 <= self.stats_frac_bits <= 40:
            found.append("frac_bits and stats_frac_bits must lie in [0, 40]")
            return found
        if self.party_magnitude_bound < 1:
            found.append(f"plain_modulus leaves no room for {self.max_parties} parties' sum in a digit")
            return found
        largest_update = self.max_weight * self.max_abs_value * 2**self.frac_bits
        if largest_update > self.party_magnitude_bound:
            found.append(
                f"max_weight * max_abs_value * 2^frac_bits = 2^{math.log2(largest_update):.1f} exceeds "
                f"the per-party bound 2^{math.log2(self.party_magnitude_bound):.1f} "
                f"for {self.max_parties} parties"
            )
        if self.max_weight > self.party_magnitude_bound:
            found.append("max_weight exceeds the per-party bound of the weight's digit")
        # Each prime of b bits exceeds 2^(b-1): a lower bound on SEAL's actual data modulus.
        data_bits = self.coeff_mod_bit_sizes[: self.data_prime_count]
        q_lower = 2 ** (sum(data_bits) - len(data_bits))
        if q_lower <= 2 * self.plain_modulus:
            found.append("the data modulus q must exceed 2t")
        if self.ciphertexts_per_chunk < 1:
            found.append("ciphertexts_per_chunk must be positive")
        return found

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> HeParams:
        """Build from a key file's header; raises ValueError or TypeError on anything unexpected.
        A key file of the earlier codec (no values_per_slot) keeps its one value per slot."""
        fields = {**_LEGACY_FIELDS, **raw}
        fields["coeff_mod_bit_sizes"] = tuple(int(bits) for bits in fields["coeff_mod_bit_sizes"])
        fields["max_abs_value"] = float(fields["max_abs_value"])
        return cls(**fields)


def _integer_root(value: int, k: int) -> int:
    """floor(value^(1/k)) for a positive integer, exactly."""
    root = round(value ** (1.0 / k))
    while root**k > value:
        root -= 1
    while (root + 1) ** k <= value:
        root += 1
    return root


DEFAULT_PARAMS = HeParams()
