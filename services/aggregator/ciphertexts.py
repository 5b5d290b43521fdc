"""The aggregator's only use of HE: check a submitted chunk's header and add chunks blind."""

from __future__ import annotations

from collections.abc import Sequence

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.he.chunk_format import unpack_header
from fibemrss.he.codec import ChunkAccumulator
from fibemrss.he.errors import HeError
from fibemrss.he.keys import AggregatorKey


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

    def new_accumulator(self) -> ChunkAccumulator:
        return ChunkAccumulator(self._key)

    def add(self, parts: Sequence[bytes]) -> bytes:
        """The encrypted slot-wise sum of one chunk position over all hospitals."""
        accumulator = ChunkAccumulator(self._key)
        for part in parts:
            accumulator.add(part)
        return accumulator.result()
