"""`fibemrss bench round`: wall time of a full encrypted round with a real aggregator on loopback.

Four hospital processes each encrypt an update of n parameters, stream it to the aggregator
process (which stores it in PostgreSQL and adds the ciphertexts), fetch the encrypted sum and
decrypt it. No local training. A round's time runs from the first hospital starting to encrypt
to the last one holding the decrypted average.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fibemrss.api.federation.v1 import federation_pb2 as pb
from fibemrss.api.federation.v1 import federation_pb2_grpc
from fibemrss.he.codec import ChunkAccumulator, UpdateDecryptor, UpdateEncryptor
from fibemrss.he.keys import load_hospital_key
from fibemrss.platform.channels import open_channel
from fibemrss.tools.bench.flower_round import flower_bin, run_flower_rounds
from fibemrss.tools.local_cluster import LocalCluster

TASK = "bench-round"


def _hospital(name: str, address: str, key_path: str, n_params: int, rounds: int, out: Any) -> None:
    key = load_hospital_key(Path(key_path).read_bytes())
    encryptor, decryptor = UpdateEncryptor(key), UpdateDecryptor(key)
    values = np.random.default_rng(abs(hash(name)) % 2**32).normal(0, 0.1, n_params)
    channel = open_channel(address)
    stub = federation_pb2_grpc.AggregatorServiceStub(channel)
    for r in range(rounds):
        stub.GetRound(pb.GetRoundRequest(task=TASK, wait_for_round=r, wait_seconds=30), timeout=60)
        began = time.time()
        chunks = encryptor.encrypt(values, 100)
        encrypted = time.time()

        def requests(r: int = r, chunks: list[bytes] = chunks) -> Iterator[pb.SubmitUpdateRequest]:
            for i, data in enumerate(chunks):
                yield pb.SubmitUpdateRequest(
                    task=TASK, round=r, hospital=name, total_chunks=len(chunks), index=i, ciphertext=data
                )

        stub.SubmitUpdate(requests(), timeout=120)
        submitted = time.time()
        stub.GetRound(pb.GetRoundRequest(task=TASK, wait_for_round=r + 1, wait_seconds=60), timeout=90)
        closed = time.time()
        summed = [c.ciphertext for c in stub.FetchAggregate(pb.FetchAggregateRequest(task=TASK, round=r))]
        fetched = time.time()
        decryptor.decrypt_average(summed, n_params)
        done = time.time()
        phases = {
            "encrypt": encrypted - began,
            "upload": submitted - encrypted,
            "wait_for_close": closed - submitted,
            "fetch": fetched - closed,
            "decrypt": done - fetched,
        }
        out.put((name, r, began, done, phases))
    channel.close()


def compute_floor(key_path: Path, n_params: int, hospitals: int) -> dict[str, float]:
    """The round's HE work alone, in this process, one core: one hospital's encryption (they run in
    parallel), the aggregator adding every upload, one decryption. No network, no database."""
    key = load_hospital_key(key_path.read_bytes())
    values = np.random.default_rng(0).normal(0, 0.1, n_params)
    began = time.perf_counter()
    upload = UpdateEncryptor(key).encrypt(values, 100)
    encrypt_s = time.perf_counter() - began
    aggregator = key.aggregator_key()
    began = time.perf_counter()
    summed = []
    for chunk in upload:
        acc = ChunkAccumulator(aggregator)
        for _ in range(hospitals):
            acc.add(chunk)
        summed.append(acc.result())
    add_s = time.perf_counter() - began
    began = time.perf_counter()
    UpdateDecryptor(key).decrypt_average(summed, n_params)
    decrypt_s = time.perf_counter() - began
    return {
        "encrypt_s": round(encrypt_s, 3),
        "aggregate_s": round(add_s, 3),
        "decrypt_s": round(decrypt_s, 3),
        "total_s": round(encrypt_s + add_s + decrypt_s, 3),
    }


def run_round_bench(
    n_params: int = 1_000_000,
    hospitals: int = 4,
    rounds: int = 5,
    workdir: Path | None = None,
    flower: str = "auto",
) -> dict[str, Any]:
    """Ours, and Flower's round in the same run: `flower` is "auto" (if its venv exists), "on"
    (build the venv with scripts/flower_venv.sh if needed) or "off"."""

    names = [f"h{i}" for i in range(hospitals)]
    with tempfile.TemporaryDirectory(prefix="fibemrss-bench-") as scratch:
        tmp = str(workdir or scratch)  # a given workdir keeps the services' logs for a look afterwards
        # Plaintext loopback, like the Flower figure it is compared with.
        cluster = LocalCluster(Path(tmp), hospitals=(), tls=False)
        endpoints = cluster.start()
        try:
            with open_channel(endpoints["aggregator"]) as ch:
                federation_pb2_grpc.AggregatorServiceStub(ch).StartFederation(
                    pb.StartFederationRequest(
                        task=TASK, rounds=rounds, quorum=hospitals, deadline_seconds=600, hospitals=names
                    )
                )
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            key = str(Path(tmp) / "keys" / "hospital.he")
            procs = [
                ctx.Process(target=_hospital, args=(n, endpoints["aggregator"], key, n_params, rounds, queue))
                for n in names
            ]
            for p in procs:
                p.start()
            results = [queue.get(timeout=600) for _ in range(hospitals * rounds)]
            for p in procs:
                p.join(timeout=60)
            floor = compute_floor(Path(key), n_params, hospitals)
        finally:
            cluster.stop()
    per_round = []
    for r in range(rounds):
        rows = [x for x in results if x[1] == r]
        per_round.append(max(x[3] for x in rows) - min(x[2] for x in rows))
    ours = statistics.median(per_round)
    # Where a round's time goes: each phase's median over hospitals and rounds.
    phase_names = list(results[0][4])
    phases = {name: round(statistics.median(x[4][name] for x in results), 3) for name in phase_names}
    flower_seconds: list[float] | None = None
    flower_note = "not run (--flower off)"
    if flower != "off":
        bin_dir = flower_bin(build=flower == "on")
        if bin_dir is None:
            flower_note = "flwr is not installed (scripts/flower_venv.sh builds it; then --flower on or auto)"
        else:
            flower_seconds = run_flower_rounds(bin_dir, n_params, hospitals, rounds)
            flower_note = (
                "flwr 1.42.0: a SuperLink and one SuperNode per hospital on loopback, plaintext FedAvg"
            )
    flower_median = statistics.median(flower_seconds) if flower_seconds else None
    return {
        "params": n_params,
        "transport": "gRPC over loopback, no TLS",
        "hospitals": hospitals,
        "rounds": rounds,
        "round_seconds": [round(s, 3) for s in per_round],
        "ours_median_s": round(ours, 3),
        "flower_round_seconds": [round(s, 3) for s in flower_seconds] if flower_seconds else None,
        "flower_median_s": round(flower_median, 3) if flower_median else None,
        "ratio": round(ours / flower_median, 3) if flower_median else None,
        "flower_note": flower_note,
        "phases_median_s": phases,
        "phases_note": "per hospital: encrypt; upload (stream until the aggregator stored it); "
        "wait_for_close (the others' uploads and the aggregator's sum); fetch; decrypt",
        "compute_floor": floor,
        "ratio_to_compute_floor": round(ours / floor["total_s"], 3) if floor["total_s"] else None,
        "goals": {
            "ratio_to_flower_at_most_0.2": (ours / flower_median <= 0.2) if flower_median else None,
            "ratio_to_compute_floor_at_most_1.5": ours <= 1.5 * floor["total_s"],
        },
    }
