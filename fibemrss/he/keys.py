"""Key ceremony and key loading: the hospitals' shared secret key and the aggregator's keyless context.

Hospitals encrypt symmetrically with the shared secret key (SEAL seeded ciphertexts: c1 travels as a
seed, half the upload size of public-key encryption), so there is no public key at all: the aggregator's key file holds
only the parameters and the key-ceremony id, which is all that adding ciphertexts needs.

File layout: MAGIC | u8 version | u8 role | u32 n | n bytes of JSON {params, key_id} | u32 m |
m bytes of SEAL secret key (m = 0 in an aggregator key).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenseal import sealapi

from fibemrss.he.errors import HeKeyError
from fibemrss.he.params import DEFAULT_PARAMS, HeParams
from fibemrss.he.seal_bytes import SealBytes

KEY_MAGIC = b"FIBEMRSS-HE-KEY\n"
KEY_FORMAT_VERSION = 1
_ROLE_HOSPITAL = 1
_ROLE_AGGREGATOR = 2
_ROLE_NAMES = {_ROLE_HOSPITAL: "hospital", _ROLE_AGGREGATOR: "aggregator"}
_U32 = struct.Struct("<I")
_KEY_ID_BYTES = 8
HOSPITAL_KEY_FILE = "hospital.he"
AGGREGATOR_KEY_FILE = "aggregator.he"


@dataclass(frozen=True, eq=False)
class AggregatorKey:
    """What the aggregator holds: it can add ciphertexts of this key ceremony, nothing else."""

    params: HeParams
    key_id: bytes
    seal_context: Any = field(repr=False)


@dataclass(frozen=True, eq=False)
class HospitalKey:
    """What every hospital holds: the shared secret key, which encrypts and decrypts."""

    params: HeParams
    key_id: bytes
    seal_context: Any = field(repr=False)
    secret_key: Any = field(repr=False)

    def aggregator_key(self) -> AggregatorKey:
        return AggregatorKey(self.params, self.key_id, self.seal_context)


def build_seal_context(params: HeParams) -> Any:
    """A SEAL context for `params`, refused unless SEAL itself agrees it is 128-bit secure and the
    noise of a whole cohort's sum stays below q / (2t) with the primes SEAL chose."""
    seal_params = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.BFV)
    seal_params.set_poly_modulus_degree(params.poly_modulus_degree)
    seal_params.set_coeff_modulus(
        sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    )
    seal_params.set_plain_modulus(params.plain_modulus)
    context = sealapi.SEALContext(seal_params, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise HeKeyError(f"SEAL rejects the HE parameters: {context.parameters_error_message()}")
    if not context.first_context_data().qualifiers().using_batching:
        raise HeKeyError("SEAL cannot batch with this plain modulus")
    data_primes = [m.value() for m in context.first_context_data().parms().coeff_modulus()]
    if len(data_primes) != params.data_prime_count:
        raise HeKeyError("SEAL keeps a different number of data primes than the parameters expect")
    problems = params.noise_problems(data_primes)
    if problems:
        raise HeKeyError("the HE parameters would not decrypt sums exactly: " + "; ".join(problems))
    return context


def generate_keys(params: HeParams = DEFAULT_PARAMS) -> tuple[bytes, bytes]:
    """Run the key ceremony: (hospital key bytes with the secret key, aggregator key bytes without)."""
    context = build_seal_context(params)
    secret_key = sealapi.KeyGenerator(context).secret_key()
    scratch = SealBytes()
    try:
        secret_key_bytes = scratch.dump(secret_key)
    finally:
        scratch.close()
    key_id = os.urandom(_KEY_ID_BYTES)
    return (
        _encode_key_file(_ROLE_HOSPITAL, params, key_id, secret_key_bytes),
        _encode_key_file(_ROLE_AGGREGATOR, params, key_id, b""),
    )


def write_key_files(
    out_dir: Path, params: HeParams = DEFAULT_PARAMS, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write hospital.he and aggregator.he (mode 0600) into out_dir; refuses to replace existing
    keys unless overwrite, because a new ceremony makes every stored aggregate unreadable."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hospital_bytes, aggregator_bytes = generate_keys(params)
    hospital_path = out_dir / HOSPITAL_KEY_FILE
    aggregator_path = out_dir / AGGREGATOR_KEY_FILE
    for path, content in ((hospital_path, hospital_bytes), (aggregator_path, aggregator_bytes)):
        write_private_file(path, content, overwrite)
    return hospital_path, aggregator_path


def write_private_file(path: Path, content: bytes, overwrite: bool = False) -> None:
    """Writes a secret: mode 0600 from its creation (never widened, never chmod-ed after), and
    never through a symbolic link. A new file is created with O_EXCL; with `overwrite`, the
    content goes to a new file beside it that is renamed over the old one, which replaces a link
    itself rather than writing to wherever it points."""
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link; a key is never written through one")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to replace it")
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if overwrite else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if overwrite:
        os.replace(target, path)


def load_hospital_key(data: bytes) -> HospitalKey:
    """Parse hospital.he; refuses anything without a secret key."""
    role, params, key_id, secret_key_bytes = _decode_key_file(data)
    if role != _ROLE_HOSPITAL or not secret_key_bytes:
        raise HeKeyError("this HE key holds no secret key: a hospital needs hospital.he, not aggregator.he")
    context = build_seal_context(params)
    secret_key = sealapi.SecretKey()
    scratch = SealBytes()
    try:
        scratch.load_into(secret_key, context, secret_key_bytes)
    except Exception as error:  # SEAL raises several types for malformed keys
        raise HeKeyError(f"the secret key inside the HE key file is corrupt: {error}") from error
    finally:
        scratch.close()
    return HospitalKey(params, key_id, context, secret_key)


def load_aggregator_key(data: bytes) -> AggregatorKey:
    """Parse aggregator.he; refuses a key that holds a secret key, so the aggregator can never decrypt."""
    role, params, key_id, secret_key_bytes = _decode_key_file(data)
    if role != _ROLE_AGGREGATOR or secret_key_bytes:
        raise HeKeyError(
            "this HE key holds a secret key: the aggregator must be started with aggregator.he, "
            "never hospital.he"
        )
    return AggregatorKey(params, key_id, build_seal_context(params))


def _encode_key_file(role: int, params: HeParams, key_id: bytes, secret_key_bytes: bytes) -> bytes:
    header = json.dumps({"params": params.to_json_dict(), "key_id": key_id.hex()}, sort_keys=True).encode()
    return b"".join(
        [
            KEY_MAGIC,
            bytes([KEY_FORMAT_VERSION, role]),
            _U32.pack(len(header)),
            header,
            _U32.pack(len(secret_key_bytes)),
            secret_key_bytes,
        ]
    )


def _decode_key_file(data: bytes) -> tuple[int, HeParams, bytes, bytes]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HeKeyError(f"an HE key must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(KEY_MAGIC):
        raise HeKeyError("not a FIBEMRSS HE key file (bad magic); generate keys with `keys init`")
    try:
        offset = len(KEY_MAGIC)
        version, role = data[offset], data[offset + 1]
        offset += 2
        (header_len,) = _U32.unpack_from(data, offset)
        offset += _U32.size
        header = json.loads(data[offset : offset + header_len])
        offset += header_len
        (secret_len,) = _U32.unpack_from(data, offset)
        offset += _U32.size
        secret_key_bytes = data[offset : offset + secret_len]
        offset += secret_len
    except (IndexError, struct.error, ValueError) as error:
        raise HeKeyError(f"HE key file is truncated or corrupt: {error}") from error
    if version != KEY_FORMAT_VERSION:
        raise HeKeyError(f"HE key format version {version} is not supported (expected {KEY_FORMAT_VERSION})")
    if role not in _ROLE_NAMES:
        raise HeKeyError(f"HE key file names an unknown role {role}")
    if len(secret_key_bytes) != secret_len or offset != len(data):
        raise HeKeyError("HE key file is truncated or has trailing bytes")
    try:
        params = HeParams.from_json_dict(header["params"])
        key_id = bytes.fromhex(header["key_id"])
    except (KeyError, TypeError, ValueError) as error:
        raise HeKeyError(f"HE key file carries invalid parameters: {error}") from error
    if len(key_id) != _KEY_ID_BYTES:
        raise HeKeyError("HE key file carries a malformed key id")
    return role, params, key_id, secret_key_bytes
