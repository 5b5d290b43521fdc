"""Homomorphic encryption of model updates and federated statistics (BFV, additive only, no I/O)."""

from fibemrss.he.codec import ChunkAccumulator, UpdateDecryptor, UpdateEncryptor, add_chunks
from fibemrss.he.errors import HeError, HeFormatError, HeKeyError, HeOverflowError
from fibemrss.he.keys import (
    AggregatorKey,
    HospitalKey,
    generate_keys,
    load_aggregator_key,
    load_hospital_key,
    write_key_files,
)
from fibemrss.he.params import DEFAULT_PARAMS, HeParams

__all__ = [
    "DEFAULT_PARAMS",
    "AggregatorKey",
    "ChunkAccumulator",
    "HeError",
    "HeFormatError",
    "HeKeyError",
    "HeOverflowError",
    "HeParams",
    "HospitalKey",
    "UpdateDecryptor",
    "UpdateEncryptor",
    "add_chunks",
    "generate_keys",
    "load_aggregator_key",
    "load_hospital_key",
    "write_key_files",
]
