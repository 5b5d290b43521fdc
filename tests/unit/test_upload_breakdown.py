"""The upload breakdown of `fibemrss bench he` accounts for every byte of a real encrypted upload."""

from __future__ import annotations

import numpy as np

from fibemrss.he.codec import UpdateEncryptor
from fibemrss.he.keys import generate_keys, load_hospital_key
from fibemrss.tools.bench.he_bench import upload_breakdown


def test_the_breakdown_adds_up_to_the_upload_and_names_the_slot_budget() -> None:
    key = load_hospital_key(generate_keys()[0])
    n_params = 10_000
    upload = UpdateEncryptor(key).encrypt(np.random.default_rng(1).uniform(-1, 1, n_params), 300)
    parts = upload_breakdown(upload, n_params, key.params)

    assert parts["bytes_per_param"] == round(sum(map(len, upload)) / n_params, 4)
    total = (
        parts["c0_packed_coefficients"] + parts["seal_seed_and_template"] + parts["chunk_headers_and_lengths"]
    )
    assert abs(total - parts["bytes_per_param"]) < 1e-3
    # c0: 72-bit coefficients (three 24-bit primes) without their 12 dropped bits, two values a slot.
    assert parts["coefficient_bits"] == 60
    assert parts["values_per_slot"] == 2
    assert parts["c0_packed_coefficients"] == round(60 / 8 * parts["slots_used_per_param"], 4)
    assert parts["slots_used_per_param"] >= 0.5
    # One party's value (2^10 weight x 2^3 x 2^5) leaves a 26-bit digit 7 bits for 128 parties' sum.
    assert parts["one_party_value_bits"] == 18.0
    assert parts["headroom_bits_for_parties"] == 7.0
