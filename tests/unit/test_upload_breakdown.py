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
        parts["c0_polynomial_words"]
        + parts["seal_header_seed_and_padding"]
        + parts["chunk_headers_and_length_prefixes"]
    )
    assert abs(total - parts["bytes_per_param"]) < 1e-3
    # c0 is one 64-bit word per slot; every parameter takes at least one slot (plus the weight slot).
    assert parts["c0_polynomial_words"] == round(8 * parts["slots_used_per_param"], 4)
    assert parts["slots_used_per_param"] >= 1.0
    # One party's value (2^16 weight x 2^7 x 2^16) leaves 47 - 1 - 39 bits for the parties' sum.
    assert parts["one_party_value_bits"] == 39.0
    assert parts["headroom_bits_for_parties"] == 7.0
