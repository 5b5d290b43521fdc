"""Measures this codec against NVIDIA FLARE's default TenSEAL CKKS setup, single-threaded, in one run.

Both sides encrypt the same n_params values once, the aggregator adds that upload four times (the
cost of adding four hospitals' uploads does not depend on their content), and a hospital decrypts.
Bytes are per parameter; times are seconds per million parameters on one core.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import tenseal as ts

from fibemrss.he.chunk_format import CompactCiphertexts, unpack_chunk
from fibemrss.he.codec import ChunkAccumulator, UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import generate_keys, load_aggregator_key, load_hospital_key
from fibemrss.he.params import HeParams

N_HOSPITALS = 4
_FLARE_POLY_MODULUS_DEGREE = 8192
_FLARE_COEFF_MOD_BIT_SIZES = [60, 40, 40]
_FLARE_GLOBAL_SCALE = 2.0**40
_FLARE_SLOTS = _FLARE_POLY_MODULUS_DEGREE // 2

_Result = TypeVar("_Result")


# Timed runs of each step after one warm-up run (imports, allocator, SEAL's first use): the median is
# reported, with the fastest and slowest, since a shared machine's load moves a single run 3x.
RUNS = 5


class _Timer:
    """Times steps: each one's median over `runs` runs after a warm-up, fastest and slowest kept."""

    def __init__(self, runs: int) -> None:
        self.runs = max(1, runs)
        self.spreads: dict[str, tuple[float, float]] = {}

    def timed(self, name: str, work: Callable[[], _Result]) -> tuple[_Result, float]:
        result = work()  # warm-up, not timed
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            result = work()
            times.append(time.perf_counter() - start)
        self.spreads[name] = (min(times), max(times))
        return result, statistics.median(times)


def upload_breakdown(upload: list[bytes], n_params: int, params: HeParams) -> dict[str, Any]:
    """Where an upload's bytes per parameter go, and the slot budget behind them: c0's bit-packed
    coefficients, SEAL's seeds and template, our chunk headers; values per slot and the bits of
    one party's value against the digit that holds the cohort's sum."""
    n_ciphertexts, coefficients, seeds = 0, 0, 0
    for chunk in upload:
        _, body = unpack_chunk(chunk)
        if not isinstance(body, CompactCiphertexts):
            raise ValueError("an upload's chunks are compact")
        n_ciphertexts += len(body.payloads)
        coefficients += sum(map(len, body.payloads))
        seeds += sum(map(len, body.tails)) + len(body.prefix)
    total = sum(map(len, upload))
    n = params.poly_modulus_degree
    coefficient_bits = coefficients * 8 / (n_ciphertexts * n)
    digit_bits = math.log2(params.digit_base)
    party_bits = math.log2(params.max_weight * params.max_abs_value * 2**params.frac_bits)
    return {
        "bytes_per_param": round(total / n_params, 4),
        "c0_packed_coefficients": round(coefficients / n_params, 4),
        "seal_seed_and_template": round(seeds / n_params, 4),
        "chunk_headers_and_lengths": round((total - coefficients - seeds) / n_params, 4),
        "slots_used_per_param": round(n_ciphertexts * n / n_params, 4),
        "values_per_slot": params.values_per_slot,
        "coefficient_bits": coefficient_bits,
        "coefficient_bits_per_value": coefficient_bits / params.values_per_slot,
        "dropped_bits_of_c0": params.c0_dropped_bits,
        "plain_modulus_bits": round(math.log2(params.plain_modulus), 2),
        "digit_bits": round(digit_bits, 2),
        "one_party_value_bits": round(party_bits, 2),
        "headroom_bits_for_parties": round(digit_bits - 1 - party_bits, 2),
    }


def _figures(
    n_params: int,
    upload: list[bytes],
    download: list[bytes],
    times: tuple[float, float, float],
    error: float,
    timer: _Timer,
) -> dict[str, Any]:
    per_million = 1e6 / n_params
    encrypt_s, aggregate_s, decrypt_s = times
    return {
        "upload_bytes_per_param": sum(map(len, upload)) / n_params,
        "download_bytes_per_param": sum(map(len, download)) / n_params,
        # medians of RUNS timed runs after a warm-up; the spread beside them
        "encrypt_s_per_million": encrypt_s * per_million,
        "aggregate_s_per_million": aggregate_s * per_million,
        "decrypt_s_per_million": decrypt_s * per_million,
        "runs": timer.runs,
        "spread_s_per_million": {
            step: [round(lo * per_million, 4), round(hi * per_million, 4)]
            for step, (lo, hi) in timer.spreads.items()
        },
        "max_abs_error": error,
    }


def _bench_ours(values: np.ndarray, weight: int, runs: int) -> dict[str, Any]:
    hospital_bytes, aggregator_bytes = generate_keys()
    hospital_key = load_hospital_key(hospital_bytes)
    aggregator_key = load_aggregator_key(aggregator_bytes)
    encryptor = UpdateEncryptor(hospital_key)
    decryptor = UpdateDecryptor(hospital_key)

    timer = _Timer(runs)
    upload, encrypt_s = timer.timed("encrypt", lambda: encryptor.encrypt(values, weight))

    def aggregate() -> list[bytes]:
        summed: list[bytes] = []
        for chunk in upload:
            accumulator = ChunkAccumulator(aggregator_key)
            for _ in range(N_HOSPITALS):
                accumulator.add(chunk)
            summed.append(accumulator.result())
        return summed

    download, aggregate_s = timer.timed("aggregate", aggregate)
    (average, _), decrypt_s = timer.timed("decrypt", lambda: decryptor.decrypt_average(download, values.size))
    error = float(np.abs(average - values).max())
    figures = _figures(values.size, upload, download, (encrypt_s, aggregate_s, decrypt_s), error, timer)
    figures["upload_breakdown"] = upload_breakdown(upload, values.size, hospital_key.params)
    return figures


def _bench_flare_ckks(values: np.ndarray, runs: int) -> dict[str, Any]:
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=_FLARE_POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=_FLARE_COEFF_MOD_BIT_SIZES,
        n_threads=1,
    )
    context.global_scale = _FLARE_GLOBAL_SCALE
    public_context = ts.context_from(context.serialize(save_secret_key=False), n_threads=1)
    slices = [values[start : start + _FLARE_SLOTS].tolist() for start in range(0, values.size, _FLARE_SLOTS)]

    timer = _Timer(runs)
    upload, encrypt_s = timer.timed(
        "encrypt", lambda: [ts.ckks_vector(context, part).serialize() for part in slices]
    )

    def aggregate() -> list[bytes]:
        summed: list[bytes] = []
        for serialized in upload:
            total = ts.ckks_vector_from(public_context, serialized)
            for _ in range(N_HOSPITALS - 1):
                total += ts.ckks_vector_from(public_context, serialized)
            summed.append(total.serialize())
        return summed

    download, aggregate_s = timer.timed("aggregate", aggregate)

    def decrypt() -> np.ndarray:
        parts = [ts.ckks_vector_from(context, serialized).decrypt() for serialized in download]
        return np.concatenate([np.asarray(part) for part in parts]) / N_HOSPITALS

    average, decrypt_s = timer.timed("decrypt", decrypt)
    error = float(np.abs(average - values).max())
    return _figures(values.size, upload, download, (encrypt_s, aggregate_s, decrypt_s), error, timer)


def run_he_bench(n_params: int = 1_000_000, runs: int = RUNS) -> dict[str, dict[str, Any]]:
    """{"ours": figures, "flare_ckks": figures}, measured now on this machine, one core each: each
    step's median of `runs` timed runs after a warm-up, with the fastest and slowest."""
    values = np.random.default_rng(0).uniform(-1.0, 1.0, n_params)
    return {"ours": _bench_ours(values, 1000, runs), "flare_ckks": _bench_flare_ckks(values, runs)}
