"""`fibemrss bench secagg`: what secure aggregation against a lying aggregator costs, per stage.

For each cohort size and dropout rate: a real aggregator process (mutual TLS from a PKI made for
the run, its own database on an embedded PostgreSQL) and n hospitals played in this process, one
thread each, each with its own gRPC channel under its own `agent@<h>` certificate, driving the
deployed protocol's state machine (`fibemrss.he.secagg.SecAggMember`) through the agent's own gRPC
adapter (`GrpcAggregator`), signing with `MaskKeySigner` and checking with `MaskKeyVerifier`.
One round: advertise (and check the cohort), shares, upload (mask, encrypt, sign, stream),
survivors (sign U3), reveals; dropped members share and then never upload, so their masks are
removed from the survivors' shares. Then one survivor checks the served sum (`verified_sum`:
the transcript, every signature, the sum recomputed from the signed uploads) and decrypts it,
and the decrypted average is compared with the survivors' weighted average.

Measured per member and stage: the protobuf bytes it sends and receives (requests and responses
as serialized, without gRPC/HTTP2/TLS framing), its thread's CPU seconds (`time.thread_time`;
gRPC's own threads are not in it, the driver's whole-process CPU is reported beside it) and
retries of refused-as-busy calls; the aggregator process's CPU (and PostgreSQL's) per stage
window and its peak RSS; the round's wall time. Fits: per-member CPU and bytes against log2 n,
the aggregator's CPU against n log2 n (least squares, R^2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
from fibemrss.he.keys import HospitalKey, load_hospital_key, write_key_files
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
from fibemrss.tools.certs import init_pki
from fibemrss.tools.service_process import ServiceProcess, base_env
from services.hospital_agent.adapters.grpc_adapters import GrpcAggregator
from services.hospital_agent.core.ports import StageView
from services.hospital_agent.core.secure_aggregation import SecureAggregation

T = TypeVar("T")
STAGES = ("advertise", "shares", "upload", "survivors", "reveals", "verify_unmask")
MIN_CONTRIBUTORS = 3
FULL_SIZES = (4, 16, 64, 128)
QUICK_SIZES = (4, 16)
FULL_PARAMS = 100_000
QUICK_PARAMS = 10_000
GOAL_UPLOAD_RATIO = 2.1
DEADLINE_SECONDS = 180.0


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
    error: str | None = None
    meter: Meter = dataclasses.field(default_factory=Meter)


class _Member:
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
    ) -> None:
        self.name = name
        self.result = MemberResult(name, dropped)
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
        self._cpu_mark = self._wall_mark = 0.0

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
        now = time.thread_time()
        self.result.cpu[self.result.meter.stage] = self.result.cpu.get(self.result.meter.stage, 0.0) + (
            now - self._cpu_mark
        )
        self.result.wall[self.result.meter.stage] = self.result.wall.get(self.result.meter.stage, 0.0) + (
            time.monotonic() - self._wall_mark
        )
        self._cpu_mark, self._wall_mark = now, time.monotonic()
        self.result.meter.stage = stage

    def _wait_stage(self, stage: str) -> StageView:
        assert self.info is not None
        while True:
            view = self._retry(lambda: self.agg.round_stage(self.info.round, stage, wait=True))
            if view.closed:
                return view
            now = self._retry(lambda: self.agg.current_round(None))
            if now.round != self.info.round or not now.accepting:
                raise RuntimeError(f"round {self.info.round} ended before its {stage} stage closed")

    def run(self, start: threading.Barrier, codec: UpdateCodec) -> None:
        r = self.result
        start.wait()
        self._cpu_mark, self._wall_mark = time.thread_time(), time.monotonic()
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
        mask = member.mask(slot_count(ChunkKind.WEIGHTED_UPDATE, self.n_params))
        chunks = codec.encrypt(self.values(), self.weight, mask)
        r.upload_ciphertext_bytes = sum(len(c) for c in chunks)
        signed = member.sign_upload(chunks)
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
        self._cpu_mark, self._wall_mark = time.thread_time(), time.monotonic()
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
            slot_count(ChunkKind.WEIGHTED_UPDATE, self.n_params),
            codec.params.plain_modulus,
        )
        return time.perf_counter() - began


def _plain_member(m: _Member, codec: UpdateCodec, start: threading.Barrier, out: dict[str, Any]) -> None:
    """An encrypted round without secure aggregation: encrypt, upload, wait for the sum."""
    start.wait()
    cpu, wall = time.thread_time(), time.monotonic()
    info = m._retry(lambda: m.agg.current_round(None))
    chunks = codec.encrypt(m.values(), m.weight)
    m._retry(lambda: m.agg.submit(info.round, chunks))
    while True:
        now = m._retry(lambda: m.agg.current_round(info.round + 1))
        if now.round > info.round or now.federation_done:
            break
    out[m.name] = (time.thread_time() - cpu, time.monotonic() - wall)


def run_plain(
    work: Path, pg: EmbeddedPostgres, keys: Path, pki: Path, key: HospitalKey, n: int, n_params: int
) -> dict[str, Any]:
    """The same members, aggregator and sizes in one encrypted round without secure aggregation
    (pairwise_masking false): the baseline the protocol's overhead is measured against."""
    names = [f"h{i:03d}" for i in range(n)]
    task = f"bench-plain-{n}"
    rng = np.random.default_rng(n * 1000 + 7)
    codec = UpdateCodec(key)
    agg = _aggregator(work / task, pg, task.replace("-", "_"), keys, pki, n)
    tls = TlsFiles(str(pki / "ca.crt"), str(pki / "operator@central.crt"), str(pki / "operator@central.key"))
    operator = open_channel(agg.address, tls, "aggregator@central")
    members = [
        _Member(h, agg.address, pki, key, task, frozenset(names), n_params, int(w), int(sd), False)
        for h, w, sd in zip(names, rng.integers(50, 500, n), rng.integers(0, 2**31, n), strict=True)
    ]
    sampler = Sampler(agg.process.pid if agg.process else 0, None)
    timings: dict[str, tuple[float, float]] = {}
    try:
        federation_pb2_grpc.AggregatorServiceStub(operator).StartFederation(
            pb.StartFederationRequest(
                task=task,
                rounds=1,
                quorum=n,
                grace_seconds=1.0,
                deadline_seconds=DEADLINE_SECONDS,
                hospitals=names,
                pairwise_masking=False,
                min_contributors=MIN_CONTRIBUTORS,
            ),
            timeout=60,
        )
        barrier = threading.Barrier(n + 1)
        threads = [
            threading.Thread(target=_plain_member, args=(m, codec, barrier, timings), daemon=True)
            for m in members
        ]
        for t in threads:
            t.start()
        sampler.start()
        barrier.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join(timeout=4 * DEADLINE_SECONDS)
        closed_at = time.monotonic()
        first = members[0]
        cpu = time.thread_time()
        served = first._retry(lambda: first.agg.fetch_aggregate(0))
        average, total = codec.decrypt_average(served, n_params, MIN_CONTRIBUTORS)
        fetch_decrypt_cpu = time.thread_time() - cpu
        ended = time.monotonic()
        sampler.stop()
    finally:
        sampler.stop()
        operator.close()
        for m in members:
            m.channel.close()
        agg.stop()
    expected = sum(m.weight * m.values() for m in members) / sum(m.weight for m in members)
    (c0, _), (c1, _) = sampler.at(t0), sampler.at(ended)
    return {
        "hospitals": n,
        "wall_s": round(ended - t0, 3),
        "round_closed_s": round(closed_at - t0, 3),
        "member_cpu_s": _stats([c for c, _ in timings.values()]),
        "fetch_and_decrypt_cpu_s": round(fetch_decrypt_cpu, 4),
        "aggregator_cpu_s": round(c1 - c0, 3),
        "member_sent_bytes": _stats([sum(m.result.meter.sent.values()) for m in members[1:]], 1),
        "exact": bool(
            float(np.max(np.abs(average - expected))) <= key.params.average_error_bound
            and total == sum(m.weight for m in members)
        ),
    }


def member_values(seed: int, n_params: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.1, n_params)


def dropped_members(names: list[str], rate: float) -> list[str]:
    """ceil-free: round(rate * n), at least one when rate > 0, spread evenly over the names."""
    if rate <= 0:
        return []
    count = max(1, round(rate * len(names)))
    step = len(names) / count
    return [names[int(i * step)] for i in range(count)]


# -- one run -------------------------------------------------------------------------------------
def _aggregator(
    work: Path, pg: EmbeddedPostgres, database: str, keys: Path, pki: Path, n: int
) -> ServiceProcess:
    env = base_env()
    env.update(
        DATABASE_URL=pg.create_database(database),
        FIBEMRSS_HE_CONTEXT=str(keys / "aggregator.he"),
        FIBEMRSS_TLS_CA=str(pki / "ca.crt"),
        FIBEMRSS_TLS_CERT=str(pki / "aggregator@central.crt"),
        FIBEMRSS_TLS_KEY=str(pki / "aggregator@central.key"),
        # Every member long-polls a stage at once: a worker each, beyond the default 32.
        FIBEMRSS_MAX_WORKERS=str(max(32, 2 * n + 16)),
        # Every member may upload at once: a connection each, within PostgreSQL's 100.
        FIBEMRSS_DB_POOL_SIZE=str(min(90, max(8, n + 4))),
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


def _stats(values: Sequence[float], digits: int = 4) -> dict[str, float] | None:
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
) -> dict[str, Any]:
    names = [f"h{i:03d}" for i in range(n)]
    dropped = set(dropped_members(names, rate))
    survivors_expected = [h for h in names if h not in dropped]
    task = f"bench-secagg-{n}-{round(rate * 100)}"
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
    agg = _aggregator(work / task, pg, task.replace("-", "_"), keys, pki, n)
    agg_pid = agg.process.pid if agg.process else 0
    tls = TlsFiles(str(pki / "ca.crt"), str(pki / "operator@central.crt"), str(pki / "operator@central.key"))
    operator = open_channel(agg.address, tls, "aggregator@central")
    stub = federation_pb2_grpc.AggregatorServiceStub(operator)
    members = [
        _Member(h, agg.address, pki, key, task, roster, n_params, weights[h], seeds[h], h in dropped)
        for h in names
    ]
    out: dict[str, Any] = {
        "hospitals": n,
        "dropout_rate": rate,
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
        barrier = threading.Barrier(n + 1)
        threads = [
            threading.Thread(target=m.run, args=(barrier, codec), name=f"member-{m.name}", daemon=True)
            for m in members
        ]
        for t in threads:
            t.start()
        sampler.start()
        process_cpu0 = time.process_time()
        barrier.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join(timeout=4 * DEADLINE_SECONDS)
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
        verifier = next((m for m in members if not m.result.dropped and m.result.error is None), None)
        verify: dict[str, Any] | None = None
        if verifier is not None:
            verify = verifier.verify(codec, task_spec)
        verified_at = time.monotonic()
        driver_cpu = time.process_time() - process_cpu0
        sampler.stop()
        out["aggregator_peak_rss_mb"] = round((peak_rss_bytes(agg_pid) or 0) / 2**20, 1)
    finally:
        sampler.stop()
        operator.close()
        for m in members:
            m.channel.close()
        agg.stop()
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
        agg_windows[stage] = {
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
            "cpu_s": _stats([r.cpu[stage] for r in rows]),
            "wall_s": _stats([r.wall[stage] for r in rows], 3),
            "sent_bytes": _stats([r.meter.sent.get(stage, 0) for r in rows], 1),
            "received_bytes": _stats([r.meter.received.get(stage, 0) for r in rows], 1),
            "calls": _stats([r.meter.calls.get(stage, 0) for r in rows], 2),
            "retries": sum(r.retries.get(stage, 0) for r in rows),
            "members_retrying": sum(1 for r in rows if r.retries.get(stage, 0)),
            "resent_bytes": _stats([r.meter.resent.get(stage, 0) for r in rows], 1),
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
            "cpu_s": _stats(per_member_cpu),
            "cpu_s_without_upload": _stats(
                [sum(r.cpu.get(s, 0.0) for s in protocol if s != "upload") for r in survivors]
            ),
            "sent_bytes": _stats(per_member_sent, 1),
            "sent_bytes_without_upload": _stats(
                [sum(r.meter.sent.get(s, 0) for s in protocol if s != "upload") for r in survivors], 1
            ),
            "received_bytes": _stats(per_member_received, 1),
        },
        "errors": {m.name: m.result.error for m in members if m.result.error},
        "driver_process_cpu_s": round(driver_cpu, 3),
        "note": "per member: protobuf bytes of its requests (sent) and responses (received) in the "
        "calls that succeeded, those of calls refused as busy and retried (resent, retries), its "
        "thread's CPU (time.thread_time) and wall time in each stage; survivor_total: advertise to "
        "reveals of each member that uploaded; verify_unmask: the one verifying member",
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
    shown = next((m.member.u3 for m in members if m.member is not None and m.member.u3), None)
    u3 = [m for m in members if shown is not None and m.name in shown]
    out["round"]["survivors"] = len(u3)
    out["round"]["honest_members_left_out"] = sorted(
        m.name for m in members if not m.result.dropped and m not in u3
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


GRACE_RULE = (
    "without dropouts the quorum is the whole cohort, so every stage closes when the last member "
    "posts and the grace never applies; with dropouts the quorum is the members expected to "
    "survive and the grace is the larger of --grace and three times the slowest stage of the same "
    "size without dropouts plus 2 s, so that no honest member is cut out by a stage closing under load (the "
    "aggregator's grace runs from the stage's opening): the upload stage then waits for the grace"
)


def slowest_stage(run: dict[str, Any]) -> float:
    """The longest time between two stage closes of a run (from its start)."""
    marks = [0.0, *run["round"]["stage_closed_at_s"].values()]
    return max(b - a for a, b in zip(marks, marks[1:], strict=False)) if len(marks) > 1 else 0.0


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


def fits(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate in sorted({r["dropout_rate"] for r in runs}):
        rows = sorted(
            (
                r
                for r in runs
                if r["dropout_rate"] == rate
                and r["members"]["survivor_total"]["cpu_s"] is not None
                and r["members"]["survivor_total"]["cpu_s_without_upload"] is not None
            ),
            key=lambda r: r["hospitals"],
        )
        ns = [float(r["hospitals"]) for r in rows]
        logn = [math.log2(n) for n in ns]
        nlogn = [n * math.log2(n) for n in ns]
        member_cpu = [r["members"]["survivor_total"]["cpu_s"]["mean"] for r in rows]
        member_cpu_nu = [r["members"]["survivor_total"]["cpu_s_without_upload"]["mean"] for r in rows]
        member_bytes = [r["members"]["survivor_total"]["sent_bytes"]["mean"] for r in rows]
        member_bytes_nu = [r["members"]["survivor_total"]["sent_bytes_without_upload"]["mean"] for r in rows]
        member_received = [r["members"]["survivor_total"]["received_bytes"]["mean"] for r in rows]
        agg_cpu = [r["aggregator"]["cpu_s"] for r in rows]
        entry: dict[str, Any] = {
            "hospitals": [int(n) for n in ns],
            "member_cpu_s": member_cpu,
            "member_cpu_vs_log2n": fit(logn, member_cpu),
            "member_cpu_vs_n": fit(ns, member_cpu),
            "member_cpu_without_upload_vs_log2n": fit(logn, member_cpu_nu),
            "member_cpu_without_upload_vs_n": fit(ns, member_cpu_nu),
            "member_sent_bytes_vs_log2n": fit(logn, member_bytes),
            "member_sent_bytes_without_upload_vs_log2n": fit(logn, member_bytes_nu),
            "member_received_bytes_vs_log2n": fit(logn, member_received),
            "member_received_bytes_vs_n": fit(ns, member_received),
            "aggregator_cpu_s": agg_cpu,
            "aggregator_cpu_vs_nlog2n": fit(nlogn, agg_cpu),
            "aggregator_cpu_vs_n": fit(ns, agg_cpu),
        }
        by_n = {int(r["hospitals"]): r for r in rows}
        if 16 in by_n and 128 in by_n:
            lo, hi = by_n[16], by_n[128]

            def growth(
                get: Callable[[dict[str, Any]], float], lo: dict[str, Any] = lo, hi: dict[str, Any] = hi
            ) -> float | None:
                return round(get(hi) / get(lo), 3) if get(lo) else None

            entry["growth_16_to_128"] = {
                "log2n": round(7 / 4, 3),
                "nlog2n": round(128 * 7 / (16 * 4), 3),
                "n": 8.0,
                "member_cpu": growth(lambda r: r["members"]["survivor_total"]["cpu_s"]["mean"]),
                "member_cpu_without_upload": growth(
                    lambda r: r["members"]["survivor_total"]["cpu_s_without_upload"]["mean"]
                ),
                "member_sent_bytes": growth(lambda r: r["members"]["survivor_total"]["sent_bytes"]["mean"]),
                "member_sent_bytes_without_upload": growth(
                    lambda r: r["members"]["survivor_total"]["sent_bytes_without_upload"]["mean"]
                ),
                "member_received_bytes": growth(
                    lambda r: r["members"]["survivor_total"]["received_bytes"]["mean"]
                ),
                "aggregator_cpu": growth(lambda r: r["aggregator"]["cpu_s"]),
            }
            g = entry["growth_16_to_128"]
            entry["goals"] = {
                "member_cost_grows_no_faster_than_log_n": g["member_cpu"] is not None
                and g["member_cpu"] <= g["log2n"],
                "aggregator_cost_grows_no_faster_than_n_log_n": g["aggregator_cpu"] is not None
                and g["aggregator_cpu"] <= g["nlog2n"],
            }
        out[f"dropout_{rate:g}"] = entry
    return out


def _fits_or_error(runs: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        return fits(runs)
    except (TypeError, KeyError, ValueError) as exc:  # the runs' figures stay reported
        return {"error": f"{type(exc).__name__}: {exc}"}


def run_secagg_bench(
    hospitals: tuple[int, ...] = FULL_SIZES,
    n_params: int = FULL_PARAMS,
    dropouts: tuple[float, ...] = (0.0, 0.1),
    grace: float = 1.0,
    workdir: Path | None = None,
    baseline: tuple[int, ...] = (4,),
) -> dict[str, Any]:
    """`baseline`: the sizes at which the same round also runs without secure aggregation."""
    if any(n < MIN_CONTRIBUTORS for n in hospitals):
        raise ValueError(f"every size must be at least min_contributors ({MIN_CONTRIBUTORS})")
    runs: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fibemrss-bench-secagg-") as scratch:
        work = Path(workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        keys, pki = work / "keys", work / "pki"
        write_key_files(keys)
        key = load_hospital_key((keys / "hospital.he").read_bytes())
        names = [f"h{i:03d}" for i in range(max(hospitals))]
        init_pki(pki, ["aggregator@central", "operator@central", *(f"agent@{h}" for h in names)])
        pg = EmbeddedPostgres(work / "postgres")
        pg.start()
        try:
            for n in hospitals:
                if n > key.params.max_parties:
                    # StartFederation refuses it: a sum of more parties would not decrypt exactly.
                    skipped.append(
                        {
                            "hospitals": n,
                            "why": f"the HE codec's sums decrypt exactly for at most "
                            f"{key.params.max_parties} parties (HeParams.max_parties); the aggregator "
                            "refuses a federation of more hospitals",
                        }
                    )
                    continue
                without: dict[str, Any] | None = None
                for rate in sorted(dropouts):
                    stage_grace = grace
                    if rate > 0 and without is not None:
                        stage_grace = max(grace, round(3 * slowest_stage(without) + 2.0, 1))
                    run = run_one(work, pg, keys, pki, key, n, rate, n_params, stage_grace)
                    run["settings"]["grace_rule"] = GRACE_RULE
                    if rate == 0:
                        without = run
                    elif without is not None:
                        run["round"]["wall_s_without_dropouts"] = without["round"]["wall_s"]
                    runs.append(run)
                    # Each run as it ends, so a later failure loses none of them.
                    (work / "runs.json").write_text(json.dumps(runs, indent=1, default=str))
                if n in baseline:
                    plain = run_plain(work, pg, keys, pki, key, n, n_params)
                    if without is not None:
                        plain["secagg_over_plain"] = {
                            "wall_with_verify_and_decrypt": round(
                                without["round"]["wall_with_verify_s"] / plain["wall_s"], 3
                            ),
                            "aggregator_cpu": round(
                                without["aggregator"]["cpu_s"] / plain["aggregator_cpu_s"], 3
                            )
                            if plain["aggregator_cpu_s"]
                            else None,
                            "member_cpu": round(
                                without["members"]["survivor_total"]["cpu_s"]["mean"]
                                / plain["member_cpu_s"]["mean"],
                                3,
                            )
                            if plain["member_cpu_s"] and plain["member_cpu_s"]["mean"]
                            else None,
                        }
                    baselines.append(plain)
        finally:
            pg.stop()
    load = os.getloadavg()
    return {
        "params": n_params,
        "hospitals": list(hospitals),
        "dropouts": list(dropouts),
        "transport": "gRPC over loopback, mutual TLS; one aggregator process per run, one embedded "
        "PostgreSQL for all runs (a database each); members are threads of this process, each "
        "with its own channel and agent@<h> certificate, signing and checking every message",
        "machine": {"cpus": os.cpu_count(), "load_average_after": [round(x, 2) for x in load]},
        "max_parties": key.params.max_parties,
        "sizes_refused": skipped,
        "runs": runs,
        "without_secure_aggregation": baselines,
        "without_secure_aggregation_note": "the same members and aggregator, one encrypted round with "
        "pairwise_masking false (encrypt, upload, the round closes; one member fetches and decrypts): "
        "the protocol's overhead is secagg_over_plain (the issue's goal of <= 15% at 4 hospitals "
        "was set against the masked round this protocol replaced, which no longer exists)",
        "fits": _fits_or_error(runs),
        "all_sums_exact": all(r["check"].get("exact") for r in runs if r["round"]["closed"]),
        "rounds_not_closed": [
            {"hospitals": r["hospitals"], "dropout_rate": r["dropout_rate"], "failure": r["round"]["failure"]}
            for r in runs
            if not r["round"]["closed"]
        ],
        "bench_seconds": round(time.monotonic() - began, 1),
    }
