"""The aggregator's only use of HE: check a submitted chunk's header and add chunks blind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.feature_encoding import input_dim, stats_vector_length
from fibemrss.domain.tasks import TASKS
from fibemrss.domain.torch_models import parameter_count
from fibemrss.he.chunk_format import ChunkHeader, ChunkKind, unpack_header
from fibemrss.he.codec import ChunkAccumulator, SerializedChunkSum, ciphertexts_per_chunk_layout
from fibemrss.he.errors import HeError
from fibemrss.he.keys import AggregatorKey
from fibemrss.he.params import HeParams

# A round's running sums stay loaded while they fit this (about 2.6M parameters); a larger round's
# are kept serialized, so its sum holds its final size in memory (issue 24: 10M parameters, 640 MB
# with loaded sums, about 210 MB serialized), while a small one pays no load and save per chunk.
LOADED_SUMS_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RoundLayout:
    """What every upload of one round must look like, so all of them add slot by slot."""

    kind: ChunkKind
    n_values: int
    chunk_count: int


def expected_layout(task: str, round_number: int, params: HeParams) -> RoundLayout | None:
    """The layout a round of a known task must have: round 0 carries the federated statistics,
    later rounds the model's parameters, each as one weighted update (weight first). None for a
    task the aggregator has no spec of: its uploads must then agree with each other."""
    spec = TASKS.get(task)
    if spec is None:
        return None
    if round_number == 0:
        n_values = stats_vector_length(spec)
    else:
        n_values = parameter_count(spec.model, input_dim(spec))
    chunks = len(ciphertexts_per_chunk_layout(params, n_values + 1))
    return RoundLayout(ChunkKind.WEIGHTED_UPDATE, n_values, chunks)


class CiphertextAdder:
    def __init__(self, key: AggregatorKey) -> None:
        self._key = key

    def check(self, chunk: bytes, index: int, total: int) -> None:
        """Cheap checks at upload time, so a malformed chunk is refused to its sender instead of
        failing the round's aggregation later."""
        field = f"chunks[{index}].ciphertext"
        try:
            header = unpack_header(chunk)
        except HeError as exc:
            raise InvalidArgument("malformed ciphertext chunk", [FieldProblem(field, str(exc))]) from None
        problems = []
        if header.key_id != self._key.key_id:
            problems.append(FieldProblem(field, "encrypted under another key ceremony than the aggregator's"))
        if header.chunk_index != index or header.chunk_count != total:
            problems.append(
                FieldProblem(
                    field,
                    f"header says chunk {header.chunk_index} of {header.chunk_count}, "
                    f"the stream says {index} of {total}",
                )
            )
        if header.parties != 1:
            problems.append(FieldProblem(field, "a submission must hold exactly one party's contribution"))
        if problems:
            raise InvalidArgument("ciphertext chunk does not fit this federation", problems)

    @property
    def params(self) -> HeParams:
        return self._key.params

    def upload_check(self, total: int, expected: RoundLayout | None) -> UploadCheck:
        """A check of one upload fed chunk by chunk as it streams in (see UploadCheck); the
        announced chunk count is checked against the round's layout at once."""
        if expected is not None and total != expected.chunk_count:
            raise InvalidArgument(
                "the upload does not fit this round's layout",
                [
                    FieldProblem(
                        "total_chunks", f"this round's layout has {expected.chunk_count} chunks, not {total}"
                    )
                ],
            )
        return UploadCheck(self, total, expected)

    def new_accumulator(self) -> ChunkAccumulator:
        return ChunkAccumulator(self._key)

    def new_sum(self, chunk_count: int) -> ChunkAccumulator | SerializedChunkSum:
        """A chunk position's running sum for a vector of `chunk_count` chunks: kept loaded (SEAL's
        polynomials: no load and save per added chunk) while all the positions' loaded sums fit
        LOADED_SUMS_BYTES, else kept serialized between additions (SerializedChunkSum, 2.5x
        smaller, at one load and one save per chunk)."""
        if chunk_count * self.loaded_chunk_bytes <= LOADED_SUMS_BYTES:
            return ChunkAccumulator(self._key)
        return SerializedChunkSum(self._key)

    @property
    def loaded_chunk_bytes(self) -> int:
        """One chunk position's sum as SEAL holds it: two polynomials of 64-bit residues per
        ciphertext."""
        p = self._key.params
        return p.ciphertexts_per_chunk * 2 * p.data_prime_count * p.poly_modulus_degree * 8

    def add(self, parts: Sequence[bytes]) -> bytes:
        """The encrypted slot-wise sum of one chunk position over all hospitals."""
        accumulator = ChunkAccumulator(self._key)
        for part in parts:
            accumulator.add(part)
        return accumulator.result()


@dataclass
class UploadCheck:
    """One upload checked as it streams in, so no whole upload is held as bytes: every index
    once, every header, every ciphertext loadable with the aggregator's context (SEAL checks
    every coefficient below q) and of the round's kind and size. Loading a chunk is adding it
    into an accumulator of its own, which `add` hands back for the round's running sum to take
    in at once (services/aggregator/core/running_sums.py), so no upload is held loaded whole. A
    bad upload is refused to its sender alone, naming the field, after its stream ended (nothing
    of it is stored, and what of it reached the running sum is subtracted again)."""

    adder: CiphertextAdder
    total: int
    expected: RoundLayout | None
    problems: list[FieldProblem] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    _position: int = 0
    _first: ChunkHeader | None = None

    def add(self, index: int, chunk: bytes) -> ChunkAccumulator | None:
        """Checks one chunk: the chunk loaded into an accumulator of its own when it and every
        chunk before it are fine (it may then be stored and summed), else None."""
        position, self._position = self._position, self._position + 1
        where = f"chunks[{position}]"
        if not 0 <= index < self.total or index in self.seen:
            self.problems.append(
                FieldProblem(f"{where}.index", f"{index} is outside 0..{self.total - 1} or repeated")
            )
            return None
        self.seen.add(index)
        try:
            self.adder.check(chunk, index, self.total)
            header = unpack_header(chunk)
            accumulator = self.adder.new_accumulator()
            accumulator.add(chunk)  # every ciphertext loads, not just the header
        except InvalidArgument as exc:
            self.problems.extend(FieldProblem(f"{where}.ciphertext", p.description) for p in exc.violations)
            return None
        except HeError as exc:
            self.problems.append(FieldProblem(f"{where}.ciphertext", str(exc)))
            return None
        self._first = self._first or header
        if self.expected is not None:
            wanted = (self.expected.kind, self.expected.n_values)
        else:
            wanted = (self._first.kind, self._first.n_values)
        if (header.kind, header.n_values) != wanted:
            self.problems.append(
                FieldProblem(
                    f"{where}.ciphertext",
                    f"holds {header.kind.name} of {header.n_values} values; "
                    f"this round takes {wanted[0].name} of {wanted[1]}",
                )
            )
            return None
        return None if self.problems else accumulator

    def finish(self) -> None:
        """After the last chunk: InvalidArgument naming every problem (at most 20)."""
        if not self.problems and len(self.seen) != self.total:
            self.problems.append(
                FieldProblem(
                    "total_chunks", f"announced {self.total} chunks, the stream carried {len(self.seen)}"
                )
            )
        if self.problems:
            raise InvalidArgument("the upload was refused; nothing of it was stored", self.problems[:20])
