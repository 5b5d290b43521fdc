"""`fibemrss bench hostile`: rounds under attack next to undisturbed rounds, in one run.

A real aggregator process with mutual TLS on loopback and a federation of four hospitals with
quorum 2. Two honest hospitals submit every round. In the disturbed run, at the same time, the
holder of `operator@h0`'s certificate keeps 40 health watches open, hospital h2 opens an upload
every round and then sends nothing, and hospital h3 sends chunks whose ciphertexts do not decode.
The undisturbed run has the two honest hospitals alone. Reported: rounds closed, the honest
hospitals' round time (first encryption to last decryption), and every honest call's outcome and
latency.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.he.codec import UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import HospitalKey, load_hospital_key
from fibemrss.platform.channels import open_channel
from fibemrss.tools.certs import init_pki
from fibemrss.tools.local_cluster import LocalCluster

T = TypeVar("T")
HOSPITALS = ("h0", "h1", "h2", "h3")
HONEST = ("h0", "h1")
GRACE_SECONDS = 0.5
HEADER_BYTES = 36  # fibemrss.he.chunk_format's header
WAIT_FOR_CLOSE = "GetRound (long poll until the round closes)"


class Calls:
    """Outcome and latency of every honest call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seconds: list[tuple[str, float]] = []
        self.failed: list[str] = []

    def timed(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            with self.lock:
                self.failed.append(f"{name}: {exc.code().name}")
            raise
        finally:
            with self.lock:
                self.seconds.append((name, time.perf_counter() - began))


def _requests(task: str, r: int, hospital: str, chunks: list[bytes]) -> Iterator[pb.SubmitUpdateRequest]:
    for i, data in enumerate(chunks):
        yield pb.SubmitUpdateRequest(
            task=task, round=r, hospital=hospital, total_chunks=len(chunks), index=i, ciphertext=data
        )


Result = tuple[str, int, float, float, bool]  # hospital, round, began, ended, round closed


def _honest(
    channel: grpc.Channel,
    key: HospitalKey,
    task: str,
    name: str,
    n: int,
    rounds: int,
    calls: Calls,
    out: list[Result],
) -> None:
    stub = federation_pb2_grpc.AggregatorServiceStub(channel)
    encryptor, decryptor = UpdateEncryptor(key), UpdateDecryptor(key)
    values = np.random.default_rng(sum(map(ord, name))).normal(0, 0.1, n)
    for r in range(rounds + 1):
        wait = pb.GetRoundRequest(task=task, wait_for_round=r, wait_seconds=30)
        calls.timed("GetRound", stub.GetRound, wait, timeout=60)
        began = time.time()
        chunks = encryptor.encrypt(values, 100)
        calls.timed("SubmitUpdate", stub.SubmitUpdate, _requests(task, r, name, chunks), timeout=60)
        wait = pb.GetRoundRequest(task=task, wait_for_round=r + 1, wait_seconds=30)
        info = calls.timed(WAIT_FOR_CLOSE, stub.GetRound, wait, timeout=60)
        closed = info.round.federation_done or info.round.round > r
        status = calls.timed(
            "GetFederationStatus",
            stub.GetFederationStatus,
            pb.GetFederationStatusRequest(task=task),
            timeout=30,
        )
        history = status.status.history
        if closed and history[r].state == pb.ROUND_STATE_CLOSED:
            request = pb.FetchAggregateRequest(task=task, round=r, hospital=name)

            def fetch(request: pb.FetchAggregateRequest = request) -> list[pb.FetchAggregateResponse]:
                return list(stub.FetchAggregate(request, timeout=60))

            parts = calls.timed("FetchAggregate", fetch)
            decryptor.decrypt_average([p.ciphertext for p in parts], n)
        out.append((name, r, began, time.time(), history[r].state == pb.ROUND_STATE_CLOSED))


def _staller(
    channel: grpc.Channel, key: HospitalKey, task: str, n: int, rounds: int, stop: threading.Event
) -> None:
    stub = federation_pb2_grpc.AggregatorServiceStub(channel)
    first = UpdateEncryptor(key).encrypt(np.zeros(n), 1)[:1]
    for r in range(rounds + 1):
        if stop.is_set():
            return

        def stalled(r: int = r) -> Iterator[pb.SubmitUpdateRequest]:
            yield pb.SubmitUpdateRequest(
                task=task, round=r, hospital="h2", total_chunks=2, index=0, ciphertext=first[0]
            )
            stop.wait(120)  # sends nothing more; the aggregator cancels it at its idle limit

        try:
            stub.SubmitUpdate(stalled(), timeout=120)
        except grpc.RpcError:
            pass


def _corrupter(
    channel: grpc.Channel, key: HospitalKey, task: str, n: int, rounds: int, stop: threading.Event
) -> int:
    stub = federation_pb2_grpc.AggregatorServiceStub(channel)
    refused = 0
    for r in range(rounds + 1):
        if stop.is_set():
            break
        chunks = UpdateEncryptor(key).encrypt(np.zeros(n), 1)
        bad = [c[: HEADER_BYTES + 4] + os.urandom(len(c) - HEADER_BYTES - 4) for c in chunks]
        try:
            stub.SubmitUpdate(_requests(task, r, "h3", bad), timeout=60)
        except grpc.RpcError as exc:
            refused += exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.GetRound(pb.GetRoundRequest(task=task, wait_for_round=r + 1, wait_seconds=30), timeout=60)
    return refused


def _flood(channel: grpc.Channel, stop: threading.Event, streams: int = 40) -> dict[str, int]:
    """Keeps `streams` watches wanted: reopens each one the server refuses or ends."""
    stub = health_pb2_grpc.HealthStub(channel)
    counts = {"opened": 0, "refused": 0}
    lock = threading.Lock()

    def hold() -> None:
        while not stop.is_set():
            call = stub.Watch(health_pb2.HealthCheckRequest())
            stop_watch = threading.Thread(target=lambda c=call: (stop.wait(), c.cancel()), daemon=True)
            stop_watch.start()
            try:
                for _ in call:
                    with lock:
                        counts["opened"] += 1
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    with lock:
                        counts["refused"] += 1
                    stop.wait(0.05)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=10)
    return counts


def _run(work: Path, task: str, n: int, rounds: int, disturbed: bool) -> dict[str, Any]:
    cluster = LocalCluster(work, hospitals=(), extra_env={"FIBEMRSS_UPLOAD_IDLE_SECONDS": "2"})
    identities = ["aggregator@central", "operator@central", *(f"agent@{h}" for h in HOSPITALS), "operator@h0"]
    init_pki(work / "pki", identities)
    endpoints = cluster.start()
    key = load_hospital_key((work / "keys" / "hospital.he").read_bytes())
    address = endpoints["aggregator"]
    channels = {i: open_channel(address, cluster.client_tls(i)) for i in identities[1:]}
    try:
        federation_pb2_grpc.AggregatorServiceStub(channels["operator@central"]).StartFederation(
            pb.StartFederationRequest(
                min_contributors=1,  # these runs test uploads and capacity, not collusion
                task=task,
                rounds=rounds,
                quorum=2,
                grace_seconds=GRACE_SECONDS,
                deadline_seconds=120,
                hospitals=list(HOSPITALS),
            ),
            timeout=30,
        )
        calls, results = Calls(), list[Result]()
        stop = threading.Event()
        extra: list[threading.Thread] = []
        flood_counts: dict[str, int] = {}
        refused: list[int] = []
        if disturbed:
            extra = [
                threading.Thread(
                    target=lambda: flood_counts.update(_flood(channels["operator@h0"], stop)), daemon=True
                ),
                threading.Thread(
                    target=_staller, args=(channels["agent@h2"], key, task, n, rounds, stop), daemon=True
                ),
                threading.Thread(
                    target=lambda: refused.append(
                        _corrupter(channels["agent@h3"], key, task, n, rounds, stop)
                    ),
                    daemon=True,
                ),
            ]
            for t in extra:
                t.start()
            time.sleep(1.0)  # the flood is in place before the first round
        honest = [
            threading.Thread(
                target=_honest, args=(channels[f"agent@{h}"], key, task, h, n, rounds, calls, results)
            )
            for h in HONEST
        ]
        for t in honest:
            t.start()
        for t in honest:
            t.join(timeout=600)
        stop.set()
        for t in extra:
            t.join(timeout=30)
    finally:
        for ch in channels.values():
            ch.close()
        cluster.stop()
    per_round = []
    closed = 0
    for r in range(1, rounds + 1):  # round 0 is the statistics round in a real federation; counted apart
        rows = [x for x in results if x[1] == r]
        if rows and all(x[4] for x in rows):
            closed += 1
        if rows:
            per_round.append(max(x[3] for x in rows) - min(x[2] for x in rows))
    seconds = sorted(s for _, s in calls.seconds)
    direct = sorted(s for name, s in calls.seconds if name != WAIT_FOR_CLOSE)
    out: dict[str, Any] = {
        "rounds_closed": closed,
        "rounds": rounds,
        "round_seconds_median": round(statistics.median(per_round), 3) if per_round else None,
        "honest_requests": len(seconds),
        "honest_failed": calls.failed,
        "honest_p99_ms": _p99_ms(seconds),
        # Without the long polls, which wait for the grace period by design.
        "honest_p99_ms_without_long_polls": _p99_ms(direct),
    }
    if disturbed:
        out["flood_watches"] = flood_counts
        out["undecodable_uploads_refused"] = refused[0] if refused else 0
    return out


def _p99_ms(sorted_seconds: list[float]) -> float | None:
    if not sorted_seconds:
        return None
    return round(1000 * sorted_seconds[max(0, int(0.99 * len(sorted_seconds)) - 1)], 1)


def run_hostile_bench(rounds: int = 10, n_params: int = 1000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fibemrss-bench-hostile-") as tmp:
        quiet = _run(Path(tmp) / "undisturbed", "bench-hostile", n_params, rounds, disturbed=False)
        attacked = _run(Path(tmp) / "disturbed", "bench-hostile", n_params, rounds, disturbed=True)
    ratio = None
    if quiet["round_seconds_median"] and attacked["round_seconds_median"]:
        ratio = round(attacked["round_seconds_median"] / quiet["round_seconds_median"], 3)
    return {
        "hospitals": list(HOSPITALS),
        "honest": list(HONEST),
        "quorum": 2,
        "grace_seconds": GRACE_SECONDS,
        "params": n_params,
        "transport": "gRPC over loopback, mutual TLS",
        "attack": "40 health watches from operator@h0, h2 stalls every upload, h3 sends undecodable chunks",
        "undisturbed": quiet,
        "disturbed": attacked,
        "round_time_ratio": ratio,
    }
