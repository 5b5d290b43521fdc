"""The deployed round driven for measurement: shared by `fibemrss bench secagg` and `fibemrss
bench round` (issue 24), so both benchmarks run the protocol we run.

A real aggregator process (mutual TLS from a PKI made for the run, its own database on an
embedded PostgreSQL) and n hospitals played in this process, one thread each, each with its own
gRPC channel under its own `agent@<h>` certificate, driving the deployed protocol's state machine
(`fibemrss.he.secagg.SecAggMember`) through the agent's own gRPC adapter (`GrpcAggregator`),
signing with `MaskKeySigner` and checking with `MaskKeyVerifier`. One round: advertise (and check
the cohort), shares, upload (mask, encrypt, sign, stream), survivors (sign U3), reveals, the wait
for the round to close; dropped members share and then never upload. Then one survivor checks
the served sum (`verified_sum`: the transcript, every signature, the sum recomputed from the
signed uploads) and decrypts it, and the average is compared with the survivors' weighted one.

Measured per member and stage: protobuf bytes sent and received, its thread's CPU seconds, wall
seconds and retries of refused-as-busy calls; the aggregator process's CPU (and PostgreSQL's)
per stage window, its RSS before the round and its peak; the round's wall time.
"""

from __future__ import annotations

import dataclasses
import os
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
from fibemrss.he.keys import HospitalKey
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
) -> dict[str, Any]:
    """One round of n members (a fraction `rate` dropping out after their shares) against a new
    aggregator process; `label` names its task and database (bench-<label>-<n>-<rate>)."""
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
    members = [
        Member(h, agg.address, pki, key, task, roster, n_params, weights[h], seeds[h], h in dropped)
        for h in names
    ]
    out: dict[str, Any] = {
        "hospitals": n,
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
            "sent_bytes": stats(per_member_sent, 1),
            "sent_bytes_without_upload": stats(
                [sum(r.meter.sent.get(s, 0) for s in protocol if s != "upload") for r in survivors], 1
            ),
            "received_bytes": stats(per_member_received, 1),
        },
        "errors": {m.name: m.result.error for m in members if m.result.error},
        "upload_encrypt_s": stats([r.encrypt_s for r in survivors], 3),
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
