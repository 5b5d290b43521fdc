"""The deployed round driven for measurement: shared by `fibemrss bench secagg` and `fibemrss
bench round` (issue 24), so both benchmarks run the protocol we run.

A real aggregator process (mutual TLS from a PKI made for the run, its own database on an
embedded PostgreSQL) and n hospitals, each with its own gRPC channel under its own `agent@<h>`
certificate, driving the deployed protocol's state machine
(`fibemrss.he.secagg.SecAggMember`) through the agent's own gRPC adapter (`GrpcAggregator`),
signing with `MaskKeySigner` and checking with `MaskKeyVerifier`. One round: advertise (and check
the cohort), shares, upload (mask, encrypt, sign, stream), survivors (sign U3), reveals, the wait
for the round to close; dropped members share and then never upload. Then one survivor checks
the served sum (`verified_sum`: the transcript, every signature, the sum recomputed from the
signed uploads) and decrypts it, and the average is compared with the survivors' weighted one.

Up to PROCESS_HOSPITALS_MAX hospitals, each is its own process, as real hospitals are on their own
machines: TenSEAL holds the GIL while it encrypts, so hospitals played as threads of one process
encrypt one after another, while the compute floor a round is compared with assumes they encrypt
at once. The processes fork from a fork server that imported only modules without gRPC
(FORK_SERVER_PRELOAD: no gRPC state crosses a fork); each builds its own channel, codec, signer
and verifier, all of them and the driver pass one start barrier, each sends its figures back as
plain data, and the verifying survivor runs `verify` in its own process. Above
that (issue 24: "in-process agents above 16 are fine"), hospitals are threads of this process.
The JSON says which (`hospitals_as`).

Measured per member and stage: protobuf bytes sent and received, its CPU seconds (its process's
when it is a process, with gRPC's threads; its thread's when it is a thread; `thread_cpu_s` is the
member's own thread either way), wall seconds and retries of refused-as-busy calls; the
aggregator process's CPU (and PostgreSQL's) per stage window, its RSS before the round and its
peak; the round's wall time.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.db.embedded import EmbeddedPostgres
from fibemrss.domain.errors import Unavailable
from fibemrss.domain.tasks import get_task
from fibemrss.he.chunk_format import ChunkKind
from fibemrss.he.codec import UpdateCodec, slot_count
from fibemrss.he.keys import HOSPITAL_KEY_FILE, HospitalKey, load_hospital_key
from fibemrss.he.mask_signatures import MaskKeySigner, MaskKeyVerifier
from fibemrss.he.secagg import graph as graphs
from fibemrss.he.secagg.protocol import (
    RoundContext,
    RoundTranscript,
    SecAggMember,
    Signatures,
    unmask_correction,
)
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import DEFAULT_TASK, TlsFiles
from fibemrss.tools.service_process import ServiceProcess, base_env
from services.hospital_agent import GrpcAggregator
from services.hospital_agent.core.ports import StageView
from services.hospital_agent.core.secure_aggregation import SecureAggregation

T = TypeVar("T")
# "close": from posting the reveals to seeing the round closed (the aggregator adds the uploads).
STAGES = ("advertise", "shares", "upload", "survivors", "reveals", "close", "verify_unmask")
MIN_CONTRIBUTORS = 3
DEADLINE_SECONDS = 180.0
GOAL_UPLOAD_RATIO = 2.1
# At this many hospitals or fewer each is a process of its own; above it, a thread of the driver.
PROCESS_HOSPITALS_MAX = 16
# How long hospital processes may take to start, load their key and open their channel.
PROCESS_SETUP_SECONDS = 300.0
# What the fork server imports once, so that each hospital forked from it skips most of its
# start-up (TenSEAL, numpy, dp_accounting: about 1.4 s of a hospital's 1.8 s on a quiet core).
# None of them imports gRPC: a forked child must inherit no gRPC state (test_hospital_processes).
FORK_SERVER_PRELOAD = (
    "fibemrss.he.codec",
    "fibemrss.he.keys",
    "fibemrss.he.mask_signatures",
    "fibemrss.he.secagg.protocol",
    "fibemrss.domain.tasks",
    "fibemrss.domain.site_policy",
)


# -- metering ---------------------------------------------------------------------------------------
class Meter(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor
):
    """Counts the serialized size of every request and response on one member's channel, by the
    stage the member is in when it makes the call: `sent` and `received` of the calls that
    succeeded, `resent` the requests of calls that failed (refused as busy, then retried)."""

    def __init__(self) -> None:
        self.stage = "advertise"
        self._lock = threading.Lock()
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.resent: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def _add(self, table: dict[str, int], stage: str, size: int) -> None:
        with self._lock:
            table[stage] += size

    def _settle(self, stage: str, outcome: Any, request_bytes: Callable[[], int]) -> Any:
        try:
            response = outcome.result()
        except grpc.RpcError:
            self._add(self.resent, stage, request_bytes())
            return outcome
        self._add(self.calls, stage, 1)
        self._add(self.sent, stage, request_bytes())
        self._add(self.received, stage, response.ByteSize())
        return outcome

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        stage = self.stage
        return self._settle(stage, continuation(details, request), request.ByteSize)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        stage = self.stage
        size = [0]

        def counted() -> Iterator[Any]:
            for request in request_iterator:
                size[0] += request.ByteSize()
                yield request

        return self._settle(stage, continuation(details, counted()), lambda: size[0])

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        stage = self.stage
        self._add(self.calls, stage, 1)
        self._add(self.sent, stage, request.ByteSize())
        return _CountedStream(continuation(details, request), lambda n: self._add(self.received, stage, n))


class _CountedStream:
    def __init__(self, call: Any, count: Callable[[int], None]) -> None:
        self._call, self._count = call, count

    def __iter__(self) -> _CountedStream:
        return self

    def __next__(self) -> Any:
        response = next(self._call)
        self._count(response.ByteSize())
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class Sampler:
    """The CPU seconds (user + system) and RSS of a process and of PostgreSQL, every 50 ms."""

    def __init__(self, pid: int, postgres_pid: int | None) -> None:
        self._proc = psutil.Process(pid)
        self._pg = psutil.Process(postgres_pid) if postgres_pid else None
        self.samples: list[tuple[float, float, float, int]] = []  # t, aggregator cpu, postgres cpu, rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="secagg-bench-sampler", daemon=True)

    def _postgres_cpu(self) -> float:
        """The postmaster's CPU with that of its ended backends (children_*) and of its live ones."""
        if self._pg is None:
            return 0.0
        own = self._pg.cpu_times()
        total = own.user + own.system + own.children_user + own.children_system
        for p in self._pg.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass  # a backend that ended between the listing and the read
        return total

    def sample(self) -> None:
        t = self._proc.cpu_times()
        rss = self._proc.memory_info().rss
        self.samples.append((time.monotonic(), t.user + t.system, self._postgres_cpu(), rss))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.sample()
            except psutil.Error:
                return

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.ident is None:
            return  # never started: the run failed before its round (StartFederation refused)
        self._thread.join(timeout=5)
        try:
            self.sample()
        except psutil.Error:
            pass  # the process already ended

    def at(self, when: float) -> tuple[float, float]:
        """(aggregator cpu, postgres cpu) of the last sample at or before `when`."""
        before = [s for s in self.samples if s[0] <= when] or self.samples[:1]
        return before[-1][1], before[-1][2]


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM of a running process (Linux), else None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- one member --------------------------------------------------------------------------------------
@dataclasses.dataclass
class MemberResult:
    name: str
    dropped: bool
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)
    wall: dict[str, float] = dataclasses.field(default_factory=dict)
    retries: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    events: dict[str, float] = dataclasses.field(default_factory=dict)
    upload_ciphertext_bytes: int = 0
    # Wall seconds of the upload stage spent masking, encrypting and signing (the rest streams).
    encrypt_s: float = 0.0
    error: str | None = None
    meter: Meter = dataclasses.field(default_factory=Meter)
    # CPU seconds of the member's own thread per stage (`cpu` is its process's when it is one).
    thread_cpu: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_plain(self) -> dict[str, Any]:
        """Picklable without the meter's lock: what a hospital process sends back."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "meter"}
        plain["retries"] = dict(self.retries)
        plain["meter"] = {
            table: dict(getattr(self.meter, table)) for table in ("sent", "received", "resent", "calls")
        }
        return plain

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> MemberResult:
        fields = dict(plain)
        tables = fields.pop("meter")
        result = cls(**fields)
        result.retries = defaultdict(int, result.retries)
        for table, counts in tables.items():
            getattr(result.meter, table).update(counts)
        return result


class StartBarrier(Protocol):
    """threading.Barrier or multiprocessing's: one start for the driver and every member."""

    def wait(self, timeout: float | None = None) -> int: ...


class Member:
    def __init__(
        self,
        name: str,
        address: str,
        pki: Path,
        key: HospitalKey,
        task: str,
        roster: frozenset[str],
        n_params: int,
        weight: int,
        seed: int,
        dropped: bool,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        """`cpu_clock`: what a stage's CPU seconds are read from (time.process_time when the
        member is a process of its own)."""
        self.name = name
        self.result = MemberResult(name, dropped)
        self._cpu_clock = cpu_clock
        self.channel = grpc.intercept_channel(
            open_channel(
                address,
                TlsFiles(str(pki / "ca.crt"), str(pki / f"agent@{name}.crt"), str(pki / f"agent@{name}.key")),
                "aggregator@central",
            ),
            self.result.meter,
        )
        self.agg = GrpcAggregator(self.channel, task, name)
        self.signer = MaskKeySigner(
            (pki / f"agent@{name}.crt").read_bytes(), (pki / f"agent@{name}.key").read_bytes()
        )
        self.verifier = MaskKeyVerifier((pki / "ca.crt").read_bytes())
        self.key = key
        self.task = task
        self.roster = roster
        self.n_params = n_params
        self.weight = weight
        self.seed = seed
        self.member: SecAggMember | None = None
        self.info: Any = None
        self._cpu_mark = self._thread_mark = self._wall_mark = 0.0

    def _mark(self) -> None:
        self._cpu_mark, self._thread_mark = self._cpu_clock(), time.thread_time()
        self._wall_mark = time.monotonic()

    def values(self) -> np.ndarray:
        return member_values(self.seed, self.n_params)

    def _retry(self, fn: Callable[[], T]) -> T:
        delay = 0.02
        while True:
            try:
                return fn()
            except Unavailable:
                self.result.retries[self.result.meter.stage] += 1
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _stage(self, stage: str) -> None:
        """Closes the previous stage's CPU and wall clock; opens `stage`."""
        r, now = self.result, self.result.meter.stage
        r.cpu[now] = r.cpu.get(now, 0.0) + self._cpu_clock() - self._cpu_mark
        r.thread_cpu[now] = r.thread_cpu.get(now, 0.0) + time.thread_time() - self._thread_mark
        r.wall[now] = r.wall.get(now, 0.0) + time.monotonic() - self._wall_mark
        self._mark()
        r.meter.stage = stage

    def _wait_stage(self, stage: str) -> StageView:
        assert self.info is not None
        while True:
            view = self._retry(lambda: self.agg.round_stage(self.info.round, stage, wait=True))
            if view.closed:
                return view
            now = self._retry(lambda: self.agg.current_round(None))
            if now.round != self.info.round or not now.accepting:
                raise RuntimeError(f"round {self.info.round} ended before its {stage} stage closed")

    def run(self, start: StartBarrier, codec: UpdateCodec, timeout: float | None = None) -> None:
        r = self.result
        start.wait(timeout)
        self._mark()
        try:
            self._run(codec)
            self._stage("done")
        except Exception as exc:  # noqa: BLE001 - reported in the JSON, the round goes on without it
            r.error = f"{type(exc).__name__}: {exc}"
            self._stage("done")

    def _run(self, codec: UpdateCodec) -> None:
        r = self.result
        # 1. advertise, then check the cohort the aggregator fixed
        info = self._retry(lambda: self.agg.current_round(None))
        self.info = info
        ctx = RoundContext(info.federation_id, self.task, info.study_hash, info.round)
        sig = Signatures(self.signer, self.verifier)
        member = SecAggMember(self.name, ctx, sig, self.roster, MIN_CONTRIBUTORS, codec.params.plain_modulus)
        self.member = member
        self._retry(lambda: self.agg.publish_mask_key(info.round, member.signed_advert()))
        while True:
            view = self._retry(self.agg.wait_for_cohort)
            if view.cohort is not None:
                break
        r.events["cohort"] = time.monotonic()
        member.accept_cohort(self._retry(lambda: self.agg.mask_keys(info.round)))
        # 2. shares
        self._stage("shares")
        boxes = member.share_boxes()
        self._retry(lambda: self.agg.post_message(info.round, "shares", sorted(boxes.items()), b"", b"", b""))
        if r.dropped:
            return  # shared, and never uploads: recovered from the survivors' shares
        shares = self._wait_stage("shares")
        r.events["shares"] = time.monotonic()
        member.accept_shares(shares.members, {s: m[0] for s, m in shares.messages.items()})
        # 3. upload
        self._stage("upload")
        mask = member.mask(slot_count(ChunkKind.WEIGHTED_UPDATE, self.n_params, codec.params))
        began = time.monotonic()
        chunks = codec.encrypt(self.values(), self.weight, mask)
        r.upload_ciphertext_bytes = sum(len(c) for c in chunks)
        signed = member.sign_upload(chunks)
        r.encrypt_s = time.monotonic() - began
        self._retry(lambda: self.agg.submit(info.round, chunks, 1, 0.0, signed.signature, signed.certificate))
        # 4. survivors
        self._stage("survivors")
        uploads = self._wait_stage("uploads")
        r.events["uploads"] = time.monotonic()
        signed = member.sign_survivors(uploads.members)
        self._retry(
            lambda: self.agg.post_message(
                info.round, "survivors", [], b"", signed.signature, signed.certificate
            )
        )
        # 5. reveals
        self._stage("reveals")
        survivors = self._wait_stage("survivors")
        r.events["survivors"] = time.monotonic()
        payload, revealed = member.reveal(uploads.members, {s: m[1] for s, m in survivors.messages.items()})
        self._retry(
            lambda: self.agg.post_message(
                info.round, "reveals", [], payload, revealed.signature, revealed.certificate
            )
        )
        self._stage("close")
        self._wait_stage("reveals")
        r.events["reveals"] = time.monotonic()
        while True:
            now = self._retry(lambda: self.agg.current_round(info.round + 1))
            if now.round > info.round or now.federation_done:
                break
        r.events["round"] = time.monotonic()

    def verify(self, codec: UpdateCodec, task_spec: Any) -> dict[str, Any]:
        """verified_sum and decryption, as an agent does before it uses a round's sum; where no
        sum is served, the transcript check and unmask_correction alone."""
        assert self.info is not None and self.member is not None
        info = self.info
        self._mark()
        self.result.meter.stage = "verify_unmask"
        out: dict[str, Any] = {"member": self.name}
        secure = SecureAggregation(
            self.name, task_spec, info.study_hash, self.agg, codec, self.signer, self.verifier
        )
        began = time.perf_counter()
        try:
            served = self._retry(lambda: self.agg.fetch_aggregate(info.round))
        except Exception as exc:  # noqa: BLE001 - no sum served: measure the transcript check alone
            out["served"] = False
            out["fetch_error"] = f"{type(exc).__name__}: {exc}"
            out["unmask_correction_s"] = round(self._transcript_only(codec), 3)
            self._stage("done")
            return out
        fetched = time.perf_counter()
        try:
            verified = secure.verified_sum(
                info.federation_id, info.round, served, ChunkKind.WEIGHTED_UPDATE, self.n_params
            )
        except Exception as exc:  # noqa: BLE001 - a refused sum is a result of the run
            self._stage("done")
            out.update(served=True, refused=f"{type(exc).__name__}: {exc}")
            return out
        checked = time.perf_counter()
        average, total_weight = codec.decrypt_average(
            verified.chunks, self.n_params, MIN_CONTRIBUTORS, verified.correction
        )
        decrypted = time.perf_counter()
        self._stage("done")
        out.update(
            served=True,
            fetch_aggregate_s=round(fetched - began, 3),
            verified_sum_s=round(checked - fetched, 3),
            decrypt_s=round(decrypted - checked, 3),
            aggregate_bytes=sum(len(c) for c in served),
        )
        out["_average"], out["_total_weight"] = average, total_weight
        return out

    def _transcript_only(self, codec: UpdateCodec) -> float:
        assert self.info is not None
        info = self.info
        began = time.perf_counter()
        adverts = self._retry(lambda: self.agg.mask_keys(info.round))

        def closed_stage(stage: str) -> StageView:
            return self._retry(lambda: self.agg.round_stage(info.round, stage, wait=False))

        stages = {s: closed_stage(s) for s in ("shares", "uploads", "survivors", "reveals")}
        transcript = RoundTranscript(
            adverts,
            stages["shares"].members,
            stages["uploads"].members,
            {s: m[1] for s, m in stages["survivors"].messages.items()},
            dict(stages["reveals"].messages),
        )
        unmask_correction(
            RoundContext(info.federation_id, self.task, info.study_hash, info.round),
            transcript,
            Signatures(self.signer, self.verifier),
            self.roster,
            MIN_CONTRIBUTORS,
            slot_count(ChunkKind.WEIGHTED_UPDATE, self.n_params, codec.params),
            codec.params.plain_modulus,
        )
        return time.perf_counter() - began


def member_values(seed: int, n_params: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.1, n_params)


def dropped_members(names: list[str], rate: float) -> list[str]:
    """ceil-free: round(rate * n), at least one when rate > 0, spread evenly over the names."""
    if rate <= 0:
        return []
    count = max(1, round(rate * len(names)))
    step = len(names) / count
    return [names[int(i * step)] for i in range(count)]


# -- the hospitals, as processes or as threads ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """What one hospital needs to play its part, as plain data: it crosses to a hospital process."""

    name: str
    address: str
    pki: Path
    key_file: Path
    task: str
    roster: frozenset[str]
    n_params: int
    weight: int
    seed: int
    dropped: bool

    def member(self, key: HospitalKey, cpu_clock: Callable[[], float] = time.thread_time) -> Member:
        return Member(
            self.name,
            self.address,
            self.pki,
            key,
            self.task,
            self.roster,
            self.n_params,
            self.weight,
            self.seed,
            self.dropped,
            cpu_clock,
        )


@dataclasses.dataclass
class Played:
    """One hospital after its round, as the run's report reads it, whichever way it ran."""

    name: str
    weight: int
    seed: int
    n_params: int
    result: MemberResult
    u3: frozenset[str] | None
    pid: int

    def values(self) -> np.ndarray:
        return member_values(self.seed, self.n_params)


class Hospitals(Protocol):
    """The members of one run. `ready` returns once every one of them waits at the start
    barrier; `start` passes it and returns the monotonic start (time.monotonic is the system's
    clock: a process's events compare with it); `join` waits for their rounds; `verify` has one
    survivor check and decrypt the sum and returns its figures and when it was done."""

    hospitals_as: str

    def ready(self) -> None: ...

    def start(self) -> float: ...

    def join(self, timeout: float) -> None: ...

    def verify(self, task_spec: Any) -> tuple[dict[str, Any] | None, float]: ...

    def played(self) -> list[Played]: ...

    def close(self) -> None: ...


class ThreadHospitals:
    """Every member a thread of this process (their encryptions take turns on the GIL)."""

    hospitals_as = "threads"

    def __init__(self, specs: Sequence[MemberSpec], key: HospitalKey, codec: UpdateCodec) -> None:
        self._codec = codec
        self._members = [spec.member(key) for spec in specs]
        self._barrier = threading.Barrier(len(specs) + 1)
        self._threads = [
            threading.Thread(target=m.run, args=(self._barrier, codec), name=f"member-{m.name}", daemon=True)
            for m in self._members
        ]

    def ready(self) -> None:
        for t in self._threads:
            t.start()

    def start(self) -> float:
        self._barrier.wait()
        return time.monotonic()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def verify(self, task_spec: Any) -> tuple[dict[str, Any] | None, float]:
        verifier = next((m for m in self._members if not m.result.dropped and m.result.error is None), None)
        out = verifier.verify(self._codec, task_spec) if verifier is not None else None
        return out, time.monotonic()

    def played(self) -> list[Played]:
        return [
            Played(
                m.name,
                m.weight,
                m.seed,
                m.n_params,
                m.result,
                m.member.u3 if m.member is not None else None,
                os.getpid(),
            )
            for m in self._members
        ]

    def close(self) -> None:
        for m in self._members:
            m.channel.close()


def _hospital_process(conn: Connection, start: StartBarrier, spec: MemberSpec, task_spec: Any) -> None:
    """One hospital as a process of its own (forked from the fork server, which never imported
    gRPC, so it inherits no gRPC state): loads the key, builds its channel, codec, signer and
    verifier, says it is ready, plays its round from the common start barrier and sends back its
    figures as plain data; then verifies the sum if the driver asks it to, or ends. Every
    message to the driver is a tuple, its kind first."""
    try:
        key = load_hospital_key(spec.key_file.read_bytes())
        codec = UpdateCodec(key)
        member = spec.member(key, time.process_time)
    except Exception as exc:  # noqa: BLE001 - the driver reports it, naming the hospital
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        conn.close()
        return
    try:
        conn.send(("ready", os.getpid()))
        try:
            member.run(start, codec, PROCESS_SETUP_SECONDS)
        except threading.BrokenBarrierError:
            return  # the driver gave up before the start
        u3 = member.member.u3 if member.member is not None else None
        conn.send(("done", member.result.to_plain(), u3))
        try:
            command = conn.recv()
        except EOFError:
            return  # the driver is gone
        if command != "verify":
            return
        try:
            out = member.verify(codec, task_spec)
        except Exception as exc:  # noqa: BLE001 - the driver reports it, naming the hospital
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("verified", out, member.result.to_plain(), time.monotonic()))
    finally:
        member.channel.close()
        conn.close()


class ProcessHospitals:
    """Every member a process of its own, from the fork server: TenSEAL holds the GIL while it
    encrypts, so only processes encrypt at once, as hospitals on their own machines do. One
    multiprocessing barrier starts the driver and every member together."""

    hospitals_as = "processes"

    def __init__(self, specs: Sequence[MemberSpec], task_spec: Any) -> None:
        self._context = multiprocessing.get_context("forkserver")
        # Takes effect when this process first starts its fork server, which then serves every run.
        self._context.set_forkserver_preload(list(FORK_SERVER_PRELOAD))
        self._specs = {spec.name: spec for spec in specs}
        self._task_spec = task_spec
        self._barrier = self._context.Barrier(len(specs) + 1)
        self._pipes: dict[str, Connection] = {}
        self._processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self._pids: dict[str, int] = {}
        self._played: dict[str, Played] = {}
        self._told: set[str] = set()

    def _answered(self, names: set[str], timeout: float) -> list[str]:
        """Those of `names` whose process sent something (or ended) within `timeout` seconds."""
        readable = wait([self._pipes[name] for name in names], timeout)
        return [name for name in names if self._pipes[name] in readable]

    def _ended(self, name: str) -> str:
        process = self._processes[name]
        process.join(timeout=5)
        return f"its process ended (exit code {process.exitcode})"

    def ready(self) -> None:
        for spec in self._specs.values():
            ours, theirs = self._context.Pipe()
            process = self._context.Process(
                target=_hospital_process,
                args=(theirs, self._barrier, spec, self._task_spec),
                name=f"hospital-{spec.name}",
                daemon=True,
            )
            self._pipes[spec.name], self._processes[spec.name] = ours, process
            process.start()
            theirs.close()
        deadline = time.monotonic() + PROCESS_SETUP_SECONDS
        waiting = set(self._pipes)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"hospitals {sorted(waiting)} were not ready within {PROCESS_SETUP_SECONDS:.0f} s"
                )
            for name in self._answered(waiting, left):
                waiting.discard(name)
                try:
                    kind, detail = self._pipes[name].recv()
                except EOFError:
                    raise RuntimeError(f"hospital {name} could not start: {self._ended(name)}") from None
                if kind != "ready":
                    raise RuntimeError(f"hospital {name} could not start: {detail}")
                self._pids[name] = detail

    def start(self) -> float:
        self._barrier.wait(PROCESS_SETUP_SECONDS)
        return time.monotonic()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(self._pipes)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for name in self._answered(waiting, left):
                waiting.discard(name)
                spec = self._specs[name]
                try:
                    _, plain, u3 = self._pipes[name].recv()
                    result = MemberResult.from_plain(plain)
                except EOFError:
                    result, u3 = MemberResult(name, spec.dropped), None
                    result.error = f"no result: {self._ended(name)}"
                self._played[name] = Played(
                    name, spec.weight, spec.seed, spec.n_params, result, u3, self._pids[name]
                )
        for name in sorted(waiting):
            spec = self._specs[name]
            result = MemberResult(name, spec.dropped, error=f"no result within {timeout:.0f} s")
            self._played[name] = Played(
                name, spec.weight, spec.seed, spec.n_params, result, None, self._pids[name]
            )

    def _tell(self, name: str, command: str) -> None:
        if name in self._told:
            return
        self._told.add(name)
        try:
            self._pipes[name].send(command)
        except OSError:
            pass  # it already ended

    def verify(self, task_spec: Any) -> tuple[dict[str, Any] | None, float]:
        """In the verifying survivor's own process. The others are told to end only after it
        (`close`): their exits would take CPU from the verification it times."""
        verifier = next((p for p in self.played() if not p.result.dropped and p.result.error is None), None)
        if verifier is None:
            return None, time.monotonic()
        self._tell(verifier.name, "verify")
        conn = self._pipes[verifier.name]
        if not conn.poll(4 * DEADLINE_SECONDS):
            raise RuntimeError(
                f"hospital {verifier.name} did not verify the sum within {4 * DEADLINE_SECONDS:.0f} s"
            )
        try:
            answer = conn.recv()
        except EOFError:
            raise RuntimeError(
                f"hospital {verifier.name} did not verify the sum: {self._ended(verifier.name)}"
            ) from None
        if answer[0] != "verified":
            raise RuntimeError(f"hospital {verifier.name} could not verify the sum: {answer[1]}")
        _, out, plain, verified_at = answer
        verifier.result = MemberResult.from_plain(plain)
        return out, verified_at

    def played(self) -> list[Played]:
        return [self._played[name] for name in self._specs if name in self._played]

    def close(self) -> None:
        self._barrier.abort()  # frees any member still waiting to start: the run failed before it
        for name in self._pipes:
            self._tell(name, "end")
        deadline = time.monotonic() + 10  # for all of them: a member still in its round is ended
        for name, process in self._processes.items():
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            self._pipes[name].close()


def default_hospitals_as(n: int) -> str:
    """A process per hospital up to PROCESS_HOSPITALS_MAX hospitals, threads above."""
    return "processes" if n <= PROCESS_HOSPITALS_MAX else "threads"


# -- one run -------------------------------------------------------------------------------------
def start_aggregator(
    work: Path,
    pg: EmbeddedPostgres,
    database: str,
    keys: Path,
    pki: Path,
    n: int,
    pool_size: int | None = None,
) -> ServiceProcess:
    """`pool_size`: FIBEMRSS_DB_POOL_SIZE; None sizes it to the cohort (a connection per member,
    within PostgreSQL's 100), 0 leaves the aggregator's default (8: uploads beyond it queue)."""
    env = base_env()
    if pool_size is None:
        pool_size = min(90, max(8, n + 4))
    if pool_size:
        env["FIBEMRSS_DB_POOL_SIZE"] = str(pool_size)
    env.update(
        DATABASE_URL=pg.create_database(database),
        FIBEMRSS_HE_CONTEXT=str(keys / "aggregator.he"),
        FIBEMRSS_TLS_CA=str(pki / "ca.crt"),
        FIBEMRSS_TLS_CERT=str(pki / "aggregator@central.crt"),
        FIBEMRSS_TLS_KEY=str(pki / "aggregator@central.key"),
        # Every member long-polls a stage at once: a worker each, beyond the default 32.
        FIBEMRSS_MAX_WORKERS=str(max(32, 2 * n + 16)),
    )
    sp = ServiceProcess("aggregator@central", env, work)
    sp.start()
    try:
        sp.wait_ready(time.monotonic() + 120)
        tls = TlsFiles(
            str(pki / "ca.crt"), str(pki / "operator@central.crt"), str(pki / "operator@central.key")
        )
        with open_channel(sp.address, tls, "aggregator@central") as ch:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60)
    except BaseException:
        sp.stop()
        raise
    return sp


def stats(values: Sequence[float], digits: int = 4) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "mean": round(float(np.mean(values)), digits),
        "max": round(float(np.max(values)), digits),
        "min": round(float(np.min(values)), digits),
    }


def run_one(
    work: Path,
    pg: EmbeddedPostgres,
    keys: Path,
    pki: Path,
    key: HospitalKey,
    n: int,
    rate: float,
    n_params: int,
    grace: float,
    label: str = "secagg",
    pool_size: int | None = None,
    hospitals_as: str | None = None,
) -> dict[str, Any]:
    """One round of n members (a fraction `rate` dropping out after their shares) against a new
    aggregator process; `label` names its task and database (bench-<label>-<n>-<rate>).
    `hospitals_as`: "processes" or "threads"; None: processes up to PROCESS_HOSPITALS_MAX members.
    `key` must be the one in keys/hospital.he (a hospital process loads it from there)."""
    hospitals_as = hospitals_as or default_hospitals_as(n)
    if hospitals_as not in ("processes", "threads"):
        raise ValueError(f"hospitals_as: {hospitals_as!r} is neither 'processes' nor 'threads'")
    names = [f"h{i:03d}" for i in range(n)]
    dropped = set(dropped_members(names, rate))
    survivors_expected = [h for h in names if h not in dropped]
    task = f"bench-{label}-{n}-{round(rate * 100)}"
    quorum = max(MIN_CONTRIBUTORS, len(survivors_expected))
    rng = np.random.default_rng(n * 1000 + round(rate * 100))
    weights = {h: int(w) for h, w in zip(names, rng.integers(50, 500, n), strict=True)}
    seeds = {h: int(s) for h, s in zip(names, rng.integers(0, 2**31, n), strict=True)}
    codec = UpdateCodec(key)
    roster = frozenset(names)
    task_spec = dataclasses.replace(
        get_task(DEFAULT_TASK), name=task, sites=tuple(names), min_contributors=MIN_CONTRIBUTORS
    )
    pg_pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    load_before = os.getloadavg()
    agg = start_aggregator(work / task, pg, task.replace("-", "_"), keys, pki, n, pool_size)
    agg_pid = agg.process.pid if agg.process else 0
    tls = TlsFiles(str(pki / "ca.crt"), str(pki / "operator@central.crt"), str(pki / "operator@central.key"))
    operator = open_channel(agg.address, tls, "aggregator@central")
    stub = federation_pb2_grpc.AggregatorServiceStub(operator)
    specs = [
        MemberSpec(
            h,
            agg.address,
            pki,
            keys / HOSPITAL_KEY_FILE,
            task,
            roster,
            n_params,
            weights[h],
            seeds[h],
            h in dropped,
        )
        for h in names
    ]
    hospitals: Hospitals = (
        ProcessHospitals(specs, task_spec)
        if hospitals_as == "processes"
        else ThreadHospitals(specs, key, codec)
    )
    out: dict[str, Any] = {
        "hospitals": n,
        "hospitals_as": hospitals.hospitals_as,
        "dropout_rate": rate,
        "load_average_before": [round(x, 2) for x in load_before],
        "dropped": len(dropped),
        "settings": {
            "rounds": 1,
            "pairwise_masking": True,
            "min_contributors": MIN_CONTRIBUTORS,
            "quorum": quorum,
            "grace_seconds": grace,
            "deadline_seconds": DEADLINE_SECONDS,
            "aggregator_max_workers": max(32, 2 * n + 16),
        },
        "graph": {
            "kind": "complete" if n <= graphs.FULL_GRAPH_MAX else "harary (SecAgg+)",
            "degree": graphs.degree(n),
        },
    }
    sampler = Sampler(agg_pid, pg_pid)
    try:
        # Every member set up (a process: imported, its key loaded, its channel built) and
        # waiting at the start barrier before the round opens, so its deadline never counts setup.
        hospitals.ready()
        stub.StartFederation(
            pb.StartFederationRequest(
                task=task,
                rounds=1,
                quorum=quorum,
                grace_seconds=grace,
                deadline_seconds=DEADLINE_SECONDS,
                hospitals=names,
                pairwise_masking=True,
                min_contributors=MIN_CONTRIBUTORS,
            ),
            timeout=60,
        )
        sampler.start()
        process_cpu0 = time.process_time()
        t0 = hospitals.start()
        hospitals.join(4 * DEADLINE_SECONDS)
        ended = time.monotonic()
        status = stub.GetFederationStatus(pb.GetFederationStatusRequest(task=task), timeout=60).status
        first = status.history[0] if status.history else None
        closed = first is not None and first.state == pb.ROUND_STATE_CLOSED
        out["round"] = {
            "closed": closed,
            "state": pb.RoundState.Name(first.state) if first else None,
            "failure": first.failure if first is not None and first.failure else None,
            "wall_s": round(ended - t0, 3),
        }
        verify, verified_at = hospitals.verify(task_spec)
        driver_cpu = time.process_time() - process_cpu0
        sampler.stop()
        out["aggregator_peak_rss_mb"] = round((peak_rss_bytes(agg_pid) or 0) / 2**20, 1)
    finally:
        sampler.stop()
        operator.close()
        hospitals.close()
        agg.stop()
    members = hospitals.played()
    # -- the round's timeline (first member to see each stage close) and the aggregator per window
    events = ["cohort", "shares", "uploads", "survivors", "reveals", "round"]
    seen = {
        e: min((m.result.events[e] for m in members if e in m.result.events), default=None) for e in events
    }
    timeline = {e: round(v - t0, 3) for e, v in seen.items() if v is not None}
    out["round"]["stage_closed_at_s"] = timeline
    out["round"]["wall_with_verify_s"] = round(verified_at - t0, 3)
    windows = {
        "advertise": ("start", "cohort"),
        "shares": ("cohort", "shares"),
        "upload": ("shares", "uploads"),
        "survivors": ("uploads", "survivors"),
        "reveals": ("survivors", "reveals"),
        "aggregate": ("reveals", "round"),
        "verify_unmask": ("round", "verified"),
    }
    marks: dict[str, float | None] = {"start": t0, **seen, "verified": verified_at}
    agg_windows: dict[str, Any] = {}
    last = t0
    for stage, (a, b) in windows.items():
        begin, end = marks[a] if marks[a] is not None else last, marks[b]
        if begin is None or end is None:
            continue
        (ca, pa), (cb, pb_) = sampler.at(begin), sampler.at(end)
        rss = [x[3] for x in sampler.samples if begin <= x[0] <= end]
        agg_windows[stage] = {
            "peak_rss_mb": round(max(rss) / 2**20, 1) if rss else None,
            "wall_s": round(end - begin, 3),
            "aggregator_cpu_s": round(cb - ca, 3),
            "postgres_cpu_s": round(pb_ - pa, 3),
        }
        last = end
    (c0, p0), (c1, p1) = sampler.at(t0), sampler.at(verified_at)
    out["aggregator"] = {
        "cpu_s": round(c1 - c0, 3),
        "postgres_cpu_s": round(p1 - p0, 3),
        "peak_rss_mb": out.pop("aggregator_peak_rss_mb"),
        # Before the start barrier: the idle process (interpreter, gRPC, SEAL context, pool).
        "rss_before_round_mb": round(sampler.samples[0][3] / 2**20, 1) if sampler.samples else None,
        "by_window": agg_windows,
        "note": "CPU of the aggregator process (psutil, user+system) and of every PostgreSQL process, "
        "from the start barrier to the end of the verification, split at the moments the first "
        "member saw each stage close (sampled every 50 ms)",
    }
    # -- members
    per_stage: dict[str, Any] = {}
    for stage in STAGES:
        rows = [m.result for m in members if stage in m.result.cpu]
        if not rows:
            continue
        per_stage[stage] = {
            "members": len(rows),
            "cpu_s": stats([r.cpu[stage] for r in rows]),
            "thread_cpu_s": stats([r.thread_cpu.get(stage, 0.0) for r in rows]),
            "wall_s": stats([r.wall[stage] for r in rows], 3),
            "sent_bytes": stats([r.meter.sent.get(stage, 0) for r in rows], 1),
            "received_bytes": stats([r.meter.received.get(stage, 0) for r in rows], 1),
            "calls": stats([r.meter.calls.get(stage, 0) for r in rows], 2),
            "retries": sum(r.retries.get(stage, 0) for r in rows),
            "members_retrying": sum(1 for r in rows if r.retries.get(stage, 0)),
            "resent_bytes": stats([r.meter.resent.get(stage, 0) for r in rows], 1),
        }
    survivors = [m.result for m in members if not m.result.dropped and m.result.error is None]
    protocol = ("advertise", "shares", "upload", "survivors", "reveals")
    per_member_cpu = [sum(r.cpu.get(s, 0.0) for s in protocol) for r in survivors]
    per_member_sent = [sum(r.meter.sent.get(s, 0) for s in protocol) for r in survivors]
    per_member_received = [sum(r.meter.received.get(s, 0) for s in protocol) for r in survivors]
    upload_bytes = [r.meter.sent.get("upload", 0) for r in survivors]
    out["members"] = {
        "per_stage": per_stage,
        "survivor_total": {
            "cpu_s": stats(per_member_cpu),
            "cpu_s_without_upload": stats(
                [sum(r.cpu.get(s, 0.0) for s in protocol if s != "upload") for r in survivors]
            ),
            # The member's own thread, as processes and as threads alike: what fits across sizes
            # played both ways compare.
            "thread_cpu_s": stats([sum(r.thread_cpu.get(s, 0.0) for s in protocol) for r in survivors]),
            "thread_cpu_s_without_upload": stats(
                [sum(r.thread_cpu.get(s, 0.0) for s in protocol if s != "upload") for r in survivors]
            ),
            "sent_bytes": stats(per_member_sent, 1),
            "sent_bytes_without_upload": stats(
                [sum(r.meter.sent.get(s, 0) for s in protocol if s != "upload") for r in survivors], 1
            ),
            "received_bytes": stats(per_member_received, 1),
        },
        "errors": {m.name: m.result.error for m in members if m.result.error},
        "upload_encrypt_s": stats([r.encrypt_s for r in survivors], 3),
        "driver_process_cpu_s": round(driver_cpu, 3),
        # Processes other than the driver's that played members: n as processes, 0 as threads.
        "member_processes": len({m.pid for m in members} - {os.getpid()}),
        "note": "per member: protobuf bytes of its requests (sent) and responses (received) in the "
        "calls that succeeded, those of calls refused as busy and retried (resent, retries), its "
        "CPU (cpu_s: its process's, time.process_time, gRPC's threads included, when hospitals_as "
        "is processes; its thread's, time.thread_time, when threads; thread_cpu_s: its own thread "
        "either way) and wall time in each stage; survivor_total: advertise to reveals of each "
        "member that uploaded; verify_unmask: the one verifying member",
    }
    upload_mean = float(np.mean(upload_bytes)) if upload_bytes else 0.0
    ciphertext = float(np.mean([r.upload_ciphertext_bytes for r in survivors])) if survivors else 0.0
    out["upload"] = {
        "message_bytes": round(upload_mean, 1),
        "ciphertext_bytes": round(ciphertext, 1),
        "float32_bytes": 4 * n_params,
        "ratio_to_float32": round(upload_mean / (4 * n_params), 4),
        "goal_at_most": GOAL_UPLOAD_RATIO,
        "met": upload_mean / (4 * n_params) <= GOAL_UPLOAD_RATIO,
    }
    # -- the sum, checked against U3 as the aggregator closed it
    shown = next((m.u3 for m in members if m.u3), None)
    u3 = [m for m in members if shown is not None and m.name in shown]
    out["round"]["survivors"] = len(u3)
    out["round"]["honest_members_left_out"] = sorted(
        m.name for m in members if not m.result.dropped and (shown is None or m.name not in shown)
    )
    check: dict[str, Any] = {}
    if verify is not None:
        average = verify.pop("_average", None)
        total_weight = verify.pop("_total_weight", None)
        if average is not None:
            expected = sum(m.weight * m.values() for m in u3) / sum(m.weight for m in u3)
            error = float(np.max(np.abs(average - expected)))
            bound = key.params.average_error_bound
            check = {
                "survivors": len(u3),
                "total_weight": total_weight,
                "expected_total_weight": sum(m.weight for m in u3),
                "max_abs_error": error,
                "average_error_bound": bound,
                "exact": bool(error <= bound and total_weight == sum(m.weight for m in u3)),
            }
        else:
            check = {"exact": None, "why": "no sum was served: " + verify.get("fetch_error", "")}
    out["verify"] = verify
    out["check"] = check
    return out


# -- fits -------------------------------------------------------------------------------------------
def fit(xs: list[float], ys: list[float]) -> dict[str, Any] | None:
    """Least squares y = a + b x, with R^2."""
    if len(xs) < 2:
        return None
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(x, y, 1)
    predicted = a + b * x
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else 1.0
    return {"intercept": float(a), "slope": float(b), "r2": round(r2, 4)}
