"""A small generational and mutational fuzzer for the volume tests: hostile protobuf requests for any
RPC (from the message descriptor) and hostile records (FHIR resources, HL7 v2 messages, CSV rows,
CSV profiles), all from one seeded `random.Random`, so a failure replays from its seed."""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
SAMPLES: dict[str, str] = {}  # one error detail per status code seen, for the printed report

TEXTS = [
    "",
    "a",
    "fuzz",
    "central",
    "a@b",
    "agent@a",
    "\x00",
    "x\x00y",
    "é",
    "💥",
    "\u202e",
    " ",
    "?",
    "'; DROP TABLE patients; --",
    "%s%s%n",
    "../../etc/passwd",
    "9" * 40,
    "-1",
    "1e309",
    "NaN",
    "2999-01-01",
    "1900-13-45",
    "mg/dL",
    "/min",
    "Patient/p1",
    "urn:uuid:p1",
    "http://loinc.org",
    "8867-4",
    "x" * 300,
]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-320, 1e308, -1e308, math.nan, math.inf, -math.inf, 70.0, 5000.0]
INTS = [0, 1, -1, 2, 3, 7, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10**6]


class Fuzz:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # -- leaves ----------------------------------------------------------------------------------
    def text(self, max_len: int = 24) -> str:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.choice(TEXTS)
        if r < 0.8:
            alphabet = "abcxyz0123456789-_.:/@^|~&\\ \n\r\t,;\"'"
            return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, max_len)))
        return "".join(chr(self.rng.randint(1, 0xD7FF)) for _ in range(self.rng.randint(0, max_len)))

    def number(self) -> float:
        if self.rng.random() < 0.6:
            return self.rng.choice(FLOATS)
        return self.rng.uniform(-1e6, 1e6)

    def integer(self, bits: int = 64, signed: bool = True) -> int:
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if self.rng.random() < 0.6:
            return min(max(self.rng.choice(INTS), lo), hi)
        return self.rng.randint(lo, hi)

    def blob(self, max_len: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_len))

    def mutate_bytes(self, data: bytes) -> bytes:
        """Cut, flip, duplicate or splice: a real payload turned slightly wrong."""
        if not data:
            return self.blob()
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 3)):
            at = self.rng.randrange(len(out)) if out else 0
            kind = self.rng.randrange(4)
            if kind == 0:
                out = out[:at]
            elif kind == 1 and out:
                out[at] ^= 1 << self.rng.randrange(8)
            elif kind == 2:
                out[at:at] = out[at : at + self.rng.randint(1, 16)]
            else:
                out[at:at] = self.blob(8)
        return bytes(out)

    def finite(self) -> float:
        value = self.number()
        return value if math.isfinite(value) else 1e308  # JSON has no NaN or Infinity

    def json_leaf(self) -> Any:
        return self.rng.choice(
            [None, True, False, self.integer(), self.finite(), self.text(), [], {}, {"value": self.finite()}]
        )

    def mutate_json(self, doc: Any, times: int) -> Any:
        """Replaces, deletes or retypes `times` random nodes of a JSON document (in place)."""
        for _ in range(times):
            parent, key = self._random_node(doc)
            if parent is None:
                return self.json_leaf()
            choice = self.rng.random()
            if choice < 0.6:
                parent[key] = self.json_leaf()
            elif choice < 0.8 and isinstance(parent, dict):
                del parent[key]
            elif isinstance(parent, dict):
                parent[self.text(8)] = self.json_leaf()
            else:
                parent.insert(self.rng.randint(0, len(parent)), self.json_leaf())
        return doc

    def _random_node(self, doc: Any) -> tuple[Any, Any]:
        nodes: list[tuple[Any, Any]] = []

        def walk(node: Any) -> None:
            items = (
                node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            )
            for k, v in list(items):
                nodes.append((node, k))
                walk(v)

        walk(doc)
        return self.rng.choice(nodes) if nodes else (None, None)

    # -- protobuf requests -------------------------------------------------------------------------
    def message(
        self, descriptor: Descriptor, cls: type[Message], hints: dict[str, Callable[[], Any]], depth: int = 0
    ) -> Message:
        """A request with every field set at random (or left out), `hints` naming a generator for a
        field by name (to reach past the first check: a real task name, a real chunk)."""
        msg = cls()
        for field in descriptor.fields:
            if self.rng.random() < 0.25:
                continue  # left at its default
            if field.is_repeated:
                count = self.rng.choice([0, 1, 1, 2, 3, 8])
                for _ in range(count):
                    self._add(msg, field, hints, depth)
            else:
                self._set(msg, field, hints, depth)
        return msg

    def _value(self, field: FieldDescriptor, hints: dict[str, Callable[[], Any]]) -> Any:
        if field.name in hints and self.rng.random() < 0.7:
            return hints[field.name]()
        t = field.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.text()
        if t == FieldDescriptor.TYPE_BYTES:
            return self.blob()
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return self.number()
        if t == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t == FieldDescriptor.TYPE_ENUM:
            return self.rng.choice([*(v.number for v in field.enum_type.values), -1, 99])
        if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
            return self.integer(32)
        if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            return self.integer(32, signed=False)
        if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
            return self.integer(64, signed=False)
        return self.integer(64)

    def _set(
        self, msg: Message, field: FieldDescriptor, hints: dict[str, Callable[[], Any]], depth: int
    ) -> None:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth < 3:
                sub = self.message(field.message_type, type(getattr(msg, field.name)), hints, depth + 1)
                getattr(msg, field.name).CopyFrom(sub)
            return
        setattr(msg, field.name, self._value(field, hints))

    def _add(
        self, msg: Message, field: FieldDescriptor, hints: dict[str, Callable[[], Any]], depth: int
    ) -> None:
        container = getattr(msg, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                key_field, value_field = (
                    field.message_type.fields_by_name["key"],
                    field.message_type.fields_by_name["value"],
                )
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    container[self._value(key_field, hints)]  # noqa: B018 - creates the entry
                else:
                    container[self._value(key_field, hints)] = self._value(value_field, hints)
                return
            if depth < 3:
                item = container.add()
                item.CopyFrom(self.message(field.message_type, type(item), hints, depth + 1))
            return
        container.append(self._value(field, hints))


def drive(
    call: Callable[[Any], grpc.Future],
    requests: Iterable[Any],
    window: int = 8,
    on_result: Callable[[Any, Any], None] | None = None,
) -> Counter[str]:
    """Sends every request with at most `window` in flight; returns how many ended with each code
    and fails on any UNKNOWN or INTERNAL (naming the request)."""
    codes: Counter[str] = Counter()
    in_flight: list[tuple[Any, grpc.Future]] = []

    def settle(request: Any, future: grpc.Future) -> None:
        for attempt in range(4):
            try:
                response = future.result()
                break
            except grpc.RpcError as exc:
                code = exc.code()
                assert code not in FORBIDDEN, f"{code.name}: {exc.details()} for {str(request)[:500]}"
                if code == grpc.StatusCode.UNAVAILABLE and attempt < 3:
                    # The connection, not the input (a handshake lost on a loaded machine): again.
                    codes["retried UNAVAILABLE"] += 1
                    time.sleep(0.2)
                    future = call(request)
                    continue
                codes[code.name] += 1
                SAMPLES.setdefault(code.name, str(exc.details())[:300])
                return
        codes["OK"] += 1
        if on_result is not None:
            on_result(request, response)

    for request in requests:
        in_flight.append((request, call(request)))
        if len(in_flight) >= window:
            settle(*in_flight.pop(0))
    for pending in in_flight:
        settle(*pending)
    return codes


class StreamFuture:
    """A server-streaming call read whole on a thread, seen as a future (for `drive`)."""

    def __init__(self, stream: Iterator[Any]) -> None:
        import threading

        self._result: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Iterator[Any]) -> None:
        try:
            self._result = list(stream)
        except grpc.RpcError as exc:
            self._error = exc

    def result(self) -> list[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8", "surrogatepass")
