"""The compact upload form: c0 recombined from its residues, its low bits dropped, and put back
within 2^(d-1) of itself, checked against exact integer arithmetic on real SEAL ciphertexts."""

from __future__ import annotations

import math

import numpy as np
from tenseal import sealapi

from fibemrss.he.compact import RnsCompressor, join_seeded, split_seeded
from fibemrss.he.keys import build_seal_context
from fibemrss.he.params import DEFAULT_PARAMS
from fibemrss.he.seal_bytes import SealBytes


def test_restored_c0_is_within_half_a_dropped_step_of_the_original_and_decrypts() -> None:
    context = build_seal_context(DEFAULT_PARAMS)
    primes = [m.value() for m in context.first_context_data().parms().coeff_modulus()]
    q, n = math.prod(primes), DEFAULT_PARAMS.poly_modulus_degree
    secret = sealapi.KeyGenerator(context).secret_key()
    encoder, scratch = sealapi.BatchEncoder(context), SealBytes()
    plain = sealapi.Plaintext()
    slots = np.random.default_rng(5).integers(-(2**50), 2**50, n)
    encoder.encode(slots.tolist(), plain)
    blob = scratch.dump(sealapi.Encryptor(context, secret).encrypt_symmetric(plain))

    parts = split_seeded(blob, len(primes), n)
    compressor = RnsCompressor(primes, n, DEFAULT_PARAMS.c0_dropped_bits)
    z = compressor.compress(parts.c0[None])
    assert compressor.bits == DEFAULT_PARAMS.coefficient_bits(primes) == 60
    assert np.array_equal(compressor.unpack(compressor.pack(z), 1), z)
    restored = compressor.restore(z)[0]

    def integer(residues: np.ndarray) -> int:  # CRT with Python's integers, the reference
        return sum(int(r) * (q // p) * pow(q // p, -1, p) for r, p in zip(residues, primes, strict=True)) % q

    half = 2 ** (DEFAULT_PARAMS.c0_dropped_bits - 1)
    for i in range(0, n, 97):
        original = integer(parts.c0[:, i])
        assert int(z[0, i]) == original >> DEFAULT_PARAMS.c0_dropped_bits
        error = (integer(restored[:, i]) - original) % q
        assert min(error, q - error) <= half

    ciphertext = sealapi.Ciphertext()
    scratch.load_into(ciphertext, context, join_seeded(parts.prefix, restored, parts.tail))
    decrypted = sealapi.Plaintext()
    sealapi.Decryptor(context, secret).decrypt(ciphertext, decrypted)
    assert np.array_equal(encoder.decode_int64(decrypted), slots)
