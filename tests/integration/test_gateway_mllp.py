"""HL7 v2 over MLLP, driven by python-hl7's own client over mutual TLS into real PostgreSQL."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import hl7
import hl7.client
import psycopg2
import pytest

from fibemrss.db.pool import Database
from fibemrss.domain.errors import InvalidArgument
from fibemrss.platform.authorization import hospital_policy
from fibemrss.platform.config import TlsFiles
from fibemrss.platform.tls import client_ssl_context, server_ssl_context
from fibemrss.tools.certs import init_pki
from services.emr_gateway.adapters.store import GatewayStore
from services.emr_gateway.core.pseudonym import Pseudonymizer
from services.emr_gateway.core.use_cases import Gateway
from services.emr_gateway.edges.mllp import INLINE_PARSE_BYTES, MllpListen, MllpServer
from tests.conftest import SHARED_DATA, shared_file

HOSPITAL = "h"
KEY = b"mllp-test-pseudonym-key"


def count(url: str, table: str) -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return int(cur.fetchone()[0])


def gateway(url: str) -> tuple[Gateway, Database]:
    db = Database(url)
    return Gateway(GatewayStore(db), Pseudonymizer(KEY)), db


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    init_pki(out, [f"gateway@{HOSPITAL}", f"operator@{HOSPITAL}", f"agent@{HOSPITAL}", "operator@other"])
    return out


def tls(pki: Path, identity: str) -> TlsFiles:
    return TlsFiles(str(pki / "ca.crt"), str(pki / f"{identity}.crt"), str(pki / f"{identity}.key"))


@pytest.fixture
def server(fresh_database: Callable[[str], str], pki: Path) -> Iterator[tuple[MllpServer, str]]:
    url = fresh_database("hospital")
    gw, db = gateway(url)
    context = server_ssl_context(tls(pki, f"gateway@{HOSPITAL}"))
    mllp = MllpServer(gw, HOSPITAL, MllpListen("127.0.0.1", 0, context), hospital_policy(HOSPITAL)).start()
    try:
        yield mllp, url
    finally:
        mllp.stop()
        db.close()


def tls_client(address: str, pki: Path, identity: str) -> hl7.client.MLLPClient:
    """python-hl7's MLLPClient with its socket wrapped in TLS (it has no TLS option of its own)."""
    host, port = address.rsplit(":", 1)
    client = hl7.client.MLLPClient(host, int(port))
    client.socket = client_ssl_context(tls(pki, identity)).wrap_socket(client.socket, server_hostname=host)
    return client


def parse_ack(raw: bytes) -> hl7.Message:
    assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\r"), raw[:20]
    return hl7.parse(raw[1:-2].decode("utf-8"))


def messages() -> list[Path]:
    shared_file("hl7v2")
    return sorted((SHARED_DATA / "hl7v2").glob("*.hl7"))


def expected_code(fates: list[str]) -> str:
    if "unsupported" in fates:
        return "AR"
    if "rejected" in fates or "quarantined" in fates:
        return "AE"
    return "AA"


def test_every_shared_message_over_one_tls_connection_gets_its_ack(
    server: tuple[MllpServer, str], pki: Path, fresh_database: Callable[[str], str]
) -> None:
    mllp, url = server
    paths = messages()
    # The fates the same use case gives over gRPC, in a second database, are what MSA-1 must say.
    reference, ref_db = gateway(fresh_database("hospital"))
    fates = {
        p.name: [o.fate for o in reference.ingest_payload("hl7v2", p.read_bytes()).outcomes] for p in paths
    }
    ref_db.close()
    codes: dict[str, str] = {}
    ack_ids: set[str] = set()
    with tls_client(mllp.address, pki, f"operator@{HOSPITAL}") as client:
        for path in paths:
            ack = parse_ack(client.send_message(path.read_bytes()))
            control_id = hl7.parse(path.read_bytes().decode("utf-8-sig").replace("\n", "\r"))["MSH"][0][10]
            assert str(ack["MSH"][0][9]).startswith("ACK"), path.name
            ack_ids.add(str(ack["MSH"][0][10]))  # each ACK is a message with its own control id
            assert str(ack["MSA"][0][2]) == str(control_id), path.name
            codes[path.name] = str(ack["MSA"][0][1])
            assert codes[path.name] == expected_code(fates[path.name]), path.name
            if codes[path.name] != "AA":
                assert ack.segments("ERR"), path.name
            if "quarantined" in fates[path.name]:
                assert str(ack["MSA"][0][3]).startswith("quarantined"), path.name
                assert all(str(e[4]) == "W" for e in ack.segments("ERR"))
        # The same connection again: every message is now a duplicate, answered AA (or AR: unmapped).
        for path in paths:
            again = str(parse_ack(client.send_message(path.read_bytes()))["MSA"][0][1])
            assert again == ("AR" if codes[path.name] == "AR" else "AA"), path.name
    assert len(codes) == 23
    assert len(ack_ids) == 23 and all(0 < len(i) <= 20 for i in ack_ids)
    assert set(codes.values()) == {"AA", "AE", "AR"}
    assert sum(c == "AE" for c in codes.values()) == 5  # the five quarantined samples
    assert count(url, "quarantine") == 5


def test_a_rejected_message_names_its_fields_in_err_and_stores_nothing(
    server: tuple[MllpServer, str], pki: Path
) -> None:
    mllp, url = server
    bad = (
        "MSH|^~\\&|LAB|H|FIB|H|20240101120000||ORU^R01|BAD-1|P|2.5.1\r"
        "PID|1||12345^^^H^MR||DOE^JANE||19700101|F\r"
        "OBR|1|||24331-1^Lipid panel^LN\r"
        "OBX|1|NM|2093-3^Cholesterol^LN||abc|mg/dL|||||F\r"
    )
    with tls_client(mllp.address, pki, f"operator@{HOSPITAL}") as client:
        ack = parse_ack(client.send_message(bad))
        assert str(ack["MSA"][0][1]) == "AE" and str(ack["MSA"][0][2]) == "BAD-1"
        locations = [str(e[2]) for e in ack.segments("ERR")]
        assert "OBX^1^5" in locations
        assert "rejected" in str(ack["MSA"][0][3])
        # Unreadable bytes: AR, and the connection still serves the next message.
        ack = parse_ack(client.send_message("this is no HL7 message"))
        assert str(ack["MSA"][0][1]) == "AR"
        ok = bad.replace("||abc|", "||190|").replace("BAD-1", "OK-1")
        assert str(parse_ack(client.send_message(ok))["MSA"][0][1]) == "AA"
    assert count(url, "source_records") == 1


def test_a_stalled_sender_does_not_block_another(server: tuple[MllpServer, str], pki: Path) -> None:
    mllp, _ = server
    host, port = mllp.address.rsplit(":", 1)
    context = client_ssl_context(tls(pki, f"operator@{HOSPITAL}"))
    with context.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host) as stalled:
        stalled.sendall(b"\x0bMSH|^~\\&|LAB|H|FIB|H|20240101||ADT^A01|HALF|P|2.5.1\r")  # never finished
        path = messages()[0]
        with tls_client(mllp.address, pki, f"operator@{HOSPITAL}") as client:
            client.socket.settimeout(10)
            assert str(parse_ack(client.send_message(path.read_bytes()))["MSA"][0][1]) == "AA"


@pytest.mark.parametrize("identity", [f"agent@{HOSPITAL}", "operator@other"])
def test_only_the_hospitals_operator_may_ingest(
    server: tuple[MllpServer, str], pki: Path, identity: str
) -> None:
    mllp, url = server
    with tls_client(mllp.address, pki, identity) as client:
        ack = parse_ack(client.send_message(messages()[0].read_bytes()))
    assert str(ack["MSA"][0][1]) == "AR" and "refused" in str(ack["MSA"][0][3])
    assert count(url, "source_records") == 0


def test_without_a_client_certificate_nothing_is_read(server: tuple[MllpServer, str], pki: Path) -> None:
    mllp, _ = server
    host, port = mllp.address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with context.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host) as s:
            s.sendall(b"\x0b" + messages()[0].read_bytes() + b"\x1c\r")
            if not s.recv(4096):
                raise ConnectionError("closed without an answer")


def test_plaintext_on_a_named_loopback_address(fresh_database: Callable[[str], str]) -> None:
    gw, db = gateway(fresh_database("hospital"))
    mllp = MllpServer(gw, HOSPITAL, MllpListen("127.0.0.1", 0, None), hospital_policy(HOSPITAL)).start()
    try:
        host, port = mllp.address.rsplit(":", 1)
        with hl7.client.MLLPClient(host, int(port)) as client:
            ack = parse_ack(client.send_message(messages()[0].read_bytes()))
        assert str(ack["MSA"][0][1]) == "AA"
    finally:
        mllp.stop()
        db.close()


def test_batched_messages_get_the_fates_of_one_by_one(fresh_database: Callable[[str], str]) -> None:
    """The listener writes waiting messages as one batch: the fates and rows must be those of
    ingesting them one after another, re-sends and a changed re-send of one control id included."""
    paths = messages()
    first = paths[0].read_bytes()
    changed = (
        first.replace(b"EVERYMAN", b"EVERYWOMAN") if b"EVERYMAN" in first else first + b"\rNTE|1||changed"
    )
    batch = [p.read_bytes() for p in paths] + [first, changed, b"not HL7", paths[5].read_bytes()]
    one_by_one, batched = fresh_database("hospital"), fresh_database("hospital")

    gw, db = gateway(one_by_one)
    expected = []
    for m in batch:
        try:
            expected.append([o.fate for o in gw.ingest_payload("hl7v2", m).outcomes])
        except InvalidArgument as exc:
            expected.append([f"invalid:{exc.violations[0].field}"])
    db.close()
    gw, db = gateway(batched)
    got = [
        [f"invalid:{r.violations[0].field}"]
        if isinstance(r, InvalidArgument)
        else [o.fate for o in r.outcomes]
        for r in gw.ingest_messages("hl7v2", batch)
    ]
    db.close()
    assert got == expected
    assert "duplicate" in got[len(paths)]
    for table in ("source_records", "observations", "quarantine", "patients"):
        assert count(batched, table) == count(one_by_one, table), table


def _oru(control_id: str, patient: str, value: str = "190", facility: str = "H") -> bytes:
    return (
        f"MSH|^~\\&|LAB|{facility}|FIB|H|20240101120000||ORU^R01|{control_id}|P|2.5.1\r"
        f"PID|1||{patient}^^^H^MR||DOE^JANE||19700101|F\r"
        "OBR|1|||24331-1^Lipid panel^LN\r"
        f"OBX|1|NM|2093-3^Cholesterol^LN||{value}|mg/dL|||||F\r"
    ).encode()


def _pipelined(address: str, context: ssl.SSLContext, batch: list[bytes]) -> list[tuple[str, str]]:
    """Sends every message of `batch` before reading any ACK (a pipelining sender); returns each
    ACK's (MSA-1 code, MSA-2 control id), in the order they came."""
    host, port = address.rsplit(":", 1)
    with context.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host) as sock:
        sock.settimeout(60)
        sock.sendall(b"".join(b"\x0b" + m + b"\x1c\r" for m in batch))
        buffer = b""
        acks: list[tuple[str, str]] = []
        while len(acks) < len(batch):
            while b"\x1c\r" not in buffer:
                chunk = sock.recv(65536)
                assert chunk, "the gateway closed the connection before every ACK came"
                buffer += chunk
            frame, buffer = buffer.split(b"\x1c\r", 1)
            msa = parse_ack(frame + b"\x1c\r")["MSA"][0]
            acks.append((str(msa[1]), str(msa[2])))
    return acks


def _send_into(address: str, context: ssl.SSLContext, batch: list[bytes], out: list[tuple[str, str]]) -> None:
    out.extend(_pipelined(address, context, batch))


def test_concurrent_connections_share_commits_each_message_acked_after_and_stored_once(
    fresh_database: Callable[[str], str], pki: Path
) -> None:
    """Group commit: 12 connections at once, each pipelining 10 messages, share transactions (the
    metrics hook sees batches of several messages); every message gets its own ACK, in its
    connection's order, AA for the good ones, and is stored exactly once. Two messages per
    connection cannot be stored (a sending facility too long for PostgreSQL's unique index fails
    the transaction): each is answered AE alone, and the messages that shared its group are
    stored all the same. Sending everything again stores nothing new."""
    url = fresh_database("hospital")
    db = Database(url)
    batches: list[int] = []
    gw = Gateway(GatewayStore(db), Pseudonymizer(KEY), on_outcomes=lambda o: batches.append(len(o)))
    context = server_ssl_context(tls(pki, f"gateway@{HOSPITAL}"))
    mllp = MllpServer(gw, HOSPITAL, MllpListen("127.0.0.1", 0, context), hospital_policy(HOSPITAL)).start()
    # Over a btree entry's limit where it is part of the unique key, and it does not compress.
    unstorable = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(200))
    plan: list[list[bytes]] = []
    for c in range(12):
        plan.append(
            [
                _oru(f"C{c}-M{m}", f"P{c}-{m % 3}", facility=unstorable if m in (3, 7) else "H")
                for m in range(10)
            ]
        )
    client = client_ssl_context(tls(pki, f"operator@{HOSPITAL}"))
    try:
        for attempt in ("first", "again"):
            results: list[list[tuple[str, str]]] = [[] for _ in plan]
            threads = [
                threading.Thread(target=_send_into, args=(mllp.address, client, batch, out))
                for batch, out in zip(plan, results, strict=True)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            for c, acks in enumerate(results):
                assert [control for _, control in acks] == [f"C{c}-M{m}" for m in range(10)], attempt
                assert [code for code, _ in acks] == ["AE" if m in (3, 7) else "AA" for m in range(10)], (
                    attempt
                )
            assert count(url, "source_records") == 12 * 8, attempt
            assert count(url, "observations") == 12 * 8, attempt
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(DISTINCT (source_system, source_id)) FROM source_records")
            assert cur.fetchone() == (12 * 8,)
    finally:
        mllp.stop()
        db.close()
    assert max(batches) > 1, batches  # several messages shared a transaction


def test_a_large_message_parsed_in_the_pool_keeps_its_place_in_the_connections_order(
    server: tuple[MllpServer, str], pki: Path
) -> None:
    """A message over INLINE_PARSE_BYTES is parsed in the worker pool while the small ones after
    it on the same connection are parsed at once: they still go to the database after it, and
    their ACKs come in the order the messages were sent. Here the small one re-sends the large
    one's control id with another value: it must become the current version."""
    mllp, url = server
    large = _oru("SAME-1", "PL", value="190") + b"NTE|1||" + b"x" * (INLINE_PARSE_BYTES + 1000) + b"\r"
    batch = [large, _oru("SAME-1", "PL", value="200"), _oru("OTHER-1", "PS", value="abc")]
    acks = _pipelined(mllp.address, client_ssl_context(tls(pki, f"operator@{HOSPITAL}")), batch)
    assert acks == [("AA", "SAME-1"), ("AA", "SAME-1"), ("AE", "OTHER-1")]
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT r.version, o.value FROM observations o JOIN source_records r ON r.id = o.record_id "
            "ORDER BY r.version"
        )
        assert cur.fetchall() == [(1, 190.0), (2, 200.0)]
