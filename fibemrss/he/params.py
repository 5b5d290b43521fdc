"""BFV parameters of the codec, their bounds, and the checks that make those bounds hold."""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class HeParams:
    """Everything both sides must agree on; it travels inside every key file.

    Encoding: a value v of a model update with weight w becomes the integer round(w * v * 2^frac_bits)
    in one BFV slot (no limbs: the 47-bit plain modulus holds the whole sum). Slot 0 of an update
    carries w itself, so the aggregator adds dataset sizes without seeing them.
    """

    scheme: str = "BFV"
    poly_modulus_degree: int = 4096
    # One 60-bit prime: a single-level modulus (additions need no modulus switching) and the
    # smallest q that keeps 64 fresh noises below q / (2t); see docs/he-codec.md.
    coeff_mod_bit_sizes: tuple[int, ...] = (60,)
    # The largest 47-bit prime that is 1 mod 2N (SEAL's PlainModulus.Batching(4096, 47)).
    plain_modulus: int = 140_737_488_273_409
    frac_bits: int = 16
    stats_frac_bits: int = 8
    max_parties: int = 64
    max_weight: int = 2**16
    max_abs_value: float = 2.0**7
    # 32 ciphertexts: about 1 MiB uploaded (seeded) and 2 MiB aggregated per chunk, under gRPC's 4 MiB.
    ciphertexts_per_chunk: int = 32

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid HE parameters: " + "; ".join(problems))

    @property
    def slots_per_ciphertext(self) -> int:
        return self.poly_modulus_degree

    @property
    def slots_per_chunk(self) -> int:
        return self.poly_modulus_degree * self.ciphertexts_per_chunk

    @property
    def party_magnitude_bound(self) -> int:
        """Largest |encoded integer| one party may put in a slot so that max_parties of them still
        decode without wrapping: the sum must stay inside the centered range (-t/2, t/2)."""
        return (self.plain_modulus - 1) // 2 // self.max_parties

    @property
    def average_error_bound(self) -> float:
        """Worst absolute error of a decrypted weighted average: each party rounds w*v*2^f once
        (error <= 1/2), and the sum of weights is at least the number of parties."""
        return 0.5 / 2**self.frac_bits

    def max_abs_sum_value(self, frac_bits: int) -> float:
        """Largest |value| one party may pass to encrypt_sums at the given fractional bits."""
        return self.party_magnitude_bound / 2**frac_bits

    def problems(self) -> list[str]:
        """Every violated rule, in words; empty when the parameters are secure and exact."""
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
        if self.plain_modulus % (2 * n) != 1 or self.plain_modulus >= 2**60:
            found.append("plain_modulus must be a prime below 2^60 that is 1 mod 2N (batching)")
        if self.max_parties < 1 or self.max_weight < 1 or self.max_abs_value <= 0:
            found.append("max_parties, max_weight and max_abs_value must be positive")
            return found
        if not 0 <= self.frac_bits <= 40 or not 0 <= self.stats_frac_bits <= 40:
            found.append("frac_bits and stats_frac_bits must lie in [0, 40]")
            return found
        largest_update = self.max_weight * self.max_abs_value * 2**self.frac_bits
        if largest_update > self.party_magnitude_bound:
            found.append(
                f"max_weight * max_abs_value * 2^frac_bits = 2^{math.log2(largest_update):.1f} exceeds "
                f"the per-party bound 2^{math.log2(self.party_magnitude_bound):.1f} "
                f"for {self.max_parties} parties"
            )
        # Each prime of b bits exceeds 2^(b-1), so this q is a lower bound on SEAL's actual q.
        q_lower = 2 ** (log_q - len(self.coeff_mod_bit_sizes))
        # Decryption is exact while |sum of fresh noises + encoding roundings| < q / (2t).
        worst_noise = self.max_parties * (SEAL_FRESH_NOISE_BOUND + 0.5)
        if worst_noise >= q_lower / (2 * self.plain_modulus):
            found.append(f"noise of {self.max_parties} fresh ciphertexts may exceed q / (2t)")
        if self.ciphertexts_per_chunk < 1:
            found.append("ciphertexts_per_chunk must be positive")
        return found

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, raw: dict[str, Any]) -> HeParams:
        """Build from a key file's header; raises ValueError or TypeError on anything unexpected."""
        fields = dict(raw)
        fields["coeff_mod_bit_sizes"] = tuple(int(bits) for bits in fields["coeff_mod_bit_sizes"])
        fields["max_abs_value"] = float(fields["max_abs_value"])
        return cls(**fields)


DEFAULT_PARAMS = HeParams()
