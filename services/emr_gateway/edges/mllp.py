"""HL7 v2 over MLLP: a listener that ingests each framed message and answers one ACK per message.

Framing is the Minimal Lower Layer Protocol: <VT 0x0B> message <FS 0x1C><CR 0x0D>. A connection
carries any number of messages, answered in order; each one goes through the gateway's use case
for "hl7v2" payloads, the same as gRPC `Ingest`, so parsing, rules, idempotency and audit exist once.

One asyncio loop serves every connection on its own thread; a slow or stalled sender holds
nothing but its own connection. The work is a pipeline with group commits:

- each message is parsed as soon as its frame is read (on the loop, or in a small worker pool
  when large; a sender that does not wait for each ACK gets up to PIPELINE_DEPTH messages in
  flight, answered in order);
- one committer writes every parsed message waiting, of every connection, as one database
  transaction (`Gateway.ingest_parsed`: exactly the fates of one-by-one ingestion), while the
  next messages are read and parsed; when messages are still being parsed (large ones, in the
  pool) it waits for them, at most BATCH_WINDOW_SECONDS, so that they share the flush; a lone
  sender waits for no timer;
- each ACK is sent only after the transaction holding its message has committed (never before:
  an AA is a promise that the message is stored), and if a group fails, its halves are written
  again apart (down to single messages), so one bad message is answered AE alone and the others
  are stored.

With TLS (the default) the client certificate is required and its identity must pass the same
authorization as gRPC `Ingest`; a refused caller gets AR for each message, nothing stored.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fibemrss.domain.errors import DomainError, FieldProblem, InvalidArgument
from fibemrss.platform.authorization import INGEST_METHOD
from fibemrss.platform.revocation import Revocations
from fibemrss.platform.tls import peer_identity
from services.emr_gateway.core.answers import hl7_ack
from services.emr_gateway.core.ingestion import Candidate
from services.emr_gateway.core.use_cases import Gateway, IngestResult

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
# A message above this is refused and its connection closed: bounds one sender's memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# A connection that sends nothing for this long is closed (interface engines reconnect).
IDLE_TIMEOUT_SECONDS = 600.0
MAX_BATCH = 64  # messages per database transaction
# How long the committer waits for messages still being parsed before it commits without them.
BATCH_WINDOW_SECONDS = 0.002
# A message up to this size is parsed on the loop; a larger one in the worker pool.
INLINE_PARSE_BYTES = 64 * 1024
# Messages of one connection read ahead of their ACKs (a pipelining sender); then reading pauses.
PIPELINE_DEPTH = 32


@dataclass(frozen=True)
class _Parsed:
    """A message read and parsed, waiting for the committer; `answer` gets its ACK."""

    header: hl7_ack.MessageHeader  # what its ACK echoes, read when it was parsed
    candidates: list[Candidate]
    answer: asyncio.Future[bytes]


@dataclass(frozen=True)
class MllpListen:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None  # None: plaintext, only for an explicitly named local address
    # The federation CA's revocation list: a message under a revoked certificate is answered AR,
    # checked per message (an interface engine keeps its connection open for days).
    revocations: Revocations | None = None


class MllpServer:
    """Started with `start()`; `address` is HOST:PORT as bound (port 0 works); `stop()` closes it."""

    def __init__(
        self,
        gateway: Gateway,
        facility: str,
        listen: MllpListen,
        authorize: Callable[[str, str], None] | None,
        workers: int = 8,
    ) -> None:
        self._gateway = gateway
        self._facility = facility
        self._listen = listen
        self._authorize = authorize if listen.ssl_context is not None else None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mllp")
        # One thread writes: groups commit one after another, so a connection's order holds.
        self._committer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mllp-commit")
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready: list[_Parsed] = []  # parsed, in each connection's order, not yet written
        self._staging = 0  # messages read and not yet in _ready (being parsed, or behind one that is)
        self._wake: asyncio.Event | None = None
        self._committer: asyncio.Task[None] | None = None
        self._stages: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mllp-loop", daemon=True)
        self._server: asyncio.Server | None = None
        self.address = ""
        # ACK control ids (MSH-10, 20 characters): this server's random prefix and a counter. A
        # random id per ACK (uuid4) reads the OS's random source, and that system call lets the
        # loop's thread take the interpreter from the committer once per message of a group.
        self._ack_prefix = secrets.token_hex(4)
        self._ack_ids = itertools.count()

    def start(self) -> MllpServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=30)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        log.info("mllp serving", extra={"mllp": self.address, "tls": self._listen.ssl_context is not None})
        return self

    async def _open(self) -> asyncio.Server:
        self._wake = asyncio.Event()
        self._committer = asyncio.create_task(self._commit_groups())
        return await asyncio.start_server(
            self._connection,
            self._listen.host,
            self._listen.port,
            ssl=self._listen.ssl_context,
            limit=MAX_MESSAGE_BYTES,
            ssl_handshake_timeout=30 if self._listen.ssl_context is not None else None,
        )

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None

        async def close() -> None:
            server.close()
            for writer in list(self._writers):
                writer.close()  # Python 3.11 has no Server.close_clients
            # What is not written gets no ACK (the senders resend); what is being written is.
            self._stopping = True
            if self._committer is not None:
                self._committer.cancel()
            for task in [*self._stages, *self._connections]:
                task.cancel()
            if self._connections or self._stages:
                await asyncio.wait([*self._connections, *self._stages], timeout=10)
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)
        self._committer_pool.shutdown(wait=True)

    # -- one connection ----------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        identity = (
            peer_identity(writer.get_extra_info("ssl_object"), peer)
            if self._listen.ssl_context is not None
            else f"plaintext:{peer}"
        )
        refusal = self._refusal(identity)
        revocations = self._listen.revocations if self._listen.ssl_context is not None else None
        ssl_object = writer.get_extra_info("ssl_object")
        peer_certificate = ssl_object.getpeercert() if revocations is not None and ssl_object else None
        serial = peer_certificate.get("serialNumber") if peer_certificate else None
        self._writers.add(writer)
        this = asyncio.current_task()
        if this is not None:
            self._connections.add(this)
        # The ACKs to send, in the order the messages came; None ends the connection.
        answers: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue(PIPELINE_DEPTH)
        sender = asyncio.create_task(self._send_answers(answers, writer))
        previous: asyncio.Future[None] | None = None  # the connection's last message's turn
        try:
            while not sender.done():
                message = await self._read_frame(reader)
                if message is None:
                    break
                # Logged and counted by the list itself (once a minute per certificate).
                revoked = revocations.refusal_for_hex(serial, identity) if revocations else None
                if refusal or revoked:
                    reason = refusal or f"refused: {revoked}"
                    await answers.put(self._done(self._encode(message, hl7_ack.ack_refused(reason))))
                    continue
                answer, previous = self._submit(message, previous)
                await answers.put(answer)
                # The other connections' turn, and the committer's, before this one's next message:
                # a read of buffered bytes does not yield, and a sender that pipelines must not
                # keep the loop (nor fill every group) while its bytes last.
                await asyncio.sleep(0)
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.info("mllp connection ended", extra={"peer": str(peer), "reason": type(exc).__name__})
        except asyncio.LimitOverrunError:
            log.warning("mllp message over the size limit; connection closed", extra={"peer": str(peer)})
            too_large = [FieldProblem("message", f"is larger than {MAX_MESSAGE_BYTES} bytes")]
            await answers.put(self._done(self._encode(b"", hl7_ack.ack_for_problems(too_large))))
        finally:
            if self._stopping:
                sender.cancel()
            elif not sender.done():
                await answers.put(None)
            try:
                await sender  # the messages read are answered (each after its commit) before closing
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
            finally:
                if this is not None:
                    self._connections.discard(this)
                self._writers.discard(writer)
                writer.close()
                try:
                    await writer.wait_closed()
                except (ConnectionError, ssl.SSLError):
                    pass

    @staticmethod
    async def _send_answers(
        answers: asyncio.Queue[asyncio.Future[bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        """Writes each ACK when its message is stored, in the order the messages came."""
        while (answer := await answers.get()) is not None:
            ack = await answer
            try:
                writer.write(START_BLOCK + ack + END_BLOCK)
                await writer.drain()
            except (ConnectionError, ssl.SSLError):
                # The sender went: the later ACKs are dropped, their messages still written.
                while (rest := await answers.get()) is not None:
                    await rest
                return

    def _done(self, ack: bytes) -> asyncio.Future[bytes]:
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        answer.set_result(ack)
        return answer

    def _submit(
        self, message: bytes, previous: asyncio.Future[None] | None
    ) -> tuple[asyncio.Future[bytes], asyncio.Future[None]]:
        """Parses `message` and queues it for the committer once `previous` (the same connection's
        message before it) is queued, so a connection's messages stay in order. Returns its ACK to
        come, and its own turn for the next message to wait on.

        A message of up to INLINE_PARSE_BYTES is parsed here, on the loop (a fraction of a
        millisecond; two thread hand-offs per message cost more on busy cores), a larger one in
        the pool, so that it holds up no other connection."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()
        queued: asyncio.Future[None] = loop.create_future()
        parsed = self._parse(message) if len(message) <= INLINE_PARSE_BYTES else None
        if parsed is not None and (previous is None or previous.done()):
            self._enqueue(message, parsed, answer)
            queued.set_result(None)
            return answer, queued
        self._staging += 1
        task = loop.create_task(self._stage(message, parsed, previous, answer, queued))
        self._stages.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._stages.discard)
        return answer, queued

    async def _stage(
        self,
        message: bytes,
        parsed: list[Candidate] | bytes | None,
        previous: asyncio.Future[None] | None,
        answer: asyncio.Future[bytes],
        queued: asyncio.Future[None],
    ) -> None:
        """`_submit`'s slow path: parsing in the pool (when `parsed` is None), waiting for `previous`."""
        loop = asyncio.get_running_loop()
        try:
            if parsed is None:
                parsed = await loop.run_in_executor(self._pool, self._parse, message)
            if previous is not None:
                await previous
            self._enqueue(message, parsed, answer)
        finally:
            self._staging -= 1
            queued.set_result(None)
            assert self._wake is not None
            self._wake.set()

    def _enqueue(
        self, message: bytes, parsed: list[Candidate] | bytes, answer: asyncio.Future[bytes]
    ) -> None:
        if isinstance(parsed, bytes):  # refused whole: answered now, nothing to write
            answer.set_result(parsed)
            return
        self._ready.append(_Parsed(hl7_ack.read_header(message), parsed, answer))
        assert self._wake is not None
        self._wake.set()

    def _parse(self, message: bytes) -> list[Candidate] | bytes:
        """The message's candidates, or the ACK of a message refused whole."""
        try:
            return self._gateway.parse_payload("hl7v2", message)
        except InvalidArgument as exc:
            return self._encode(message, hl7_ack.ack_for_problems(exc.violations))
        except Exception:  # noqa: BLE001 - the sender gets AE and resends; the log has the cause
            log.exception("mllp message not parsed")
            return self._encode(
                message, hl7_ack.ack_for_failure("not stored, send again later: internal error")
            )

    def _refusal(self, identity: str) -> str:
        if self._authorize is None:
            return ""
        try:
            self._authorize(identity, INGEST_METHOD)
        except DomainError as exc:
            log.warning("mllp caller refused", extra={"identity": identity})
            return f"refused: {exc}"
        return ""

    @staticmethod
    async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
        """The next message between VT and FS CR; None at a clean end of the connection. Bytes
        before a VT (line noise, keep-alive newlines) are skipped, as receivers commonly do."""
        try:
            # A timeout scope, not wait_for: that one wraps each read in a task of its own.
            async with asyncio.timeout(IDLE_TIMEOUT_SECONDS):
                data = await reader.readuntil(END_BLOCK)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                log.info("mllp connection closed inside a message", extra={"bytes": len(exc.partial)})
            return None
        start = data.rfind(START_BLOCK)
        return data[start + 1 : -2] if start >= 0 else data[:-2]

    async def _commit_groups(self) -> None:
        """Writes every parsed message waiting (up to MAX_BATCH) in one transaction, then answers
        each; the messages parsed meanwhile make the next group."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._ready:
                self._wake.clear()
                await self._wake.wait()
            # A small window: messages already read and still being parsed join this flush. No
            # wait for connections yet to send: the committer stays busy, and what arrives while
            # it writes makes the next group (waiting for every open connection measured slower).
            deadline = loop.time() + BATCH_WINDOW_SECONDS
            while self._staging and len(self._ready) < MAX_BATCH and (left := deadline - loop.time()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            group, self._ready = self._ready[:MAX_BATCH], self._ready[MAX_BATCH:]
            acks = await loop.run_in_executor(self._committer_pool, self._commit, group)
            for item, ack in zip(group, acks, strict=True):
                if not item.answer.done():
                    item.answer.set_result(ack)

    def _commit(self, group: Sequence[_Parsed]) -> list[bytes]:
        """The group's ACKs, each after the transaction that stored its message committed. If the
        group's transaction fails, its halves are written again one after the other (in order),
        and so on down to single messages, so that a message that cannot be stored fails alone
        (AE: send again later) and the others are stored, still sharing transactions: one bad
        message of 64 costs about 12 more transactions instead of 64."""
        try:
            results = self._gateway.ingest_parsed([item.candidates for item in group])
        except Exception as exc:  # noqa: BLE001 - isolated below; the log has the cause
            if len(group) == 1:
                return [self._failed(group[0].header, exc)]
            log.warning("mllp group not stored; its halves are written apart", extra={"n": len(group)})
            half = len(group) // 2
            return self._commit(group[:half]) + self._commit(group[half:])
        return [self._encode_for(item.header, self._ack(r)) for item, r in zip(group, results, strict=True)]

    @staticmethod
    def _ack(result: IngestResult) -> hl7_ack.Ack:
        return hl7_ack.ack_for_outcomes(result.outcomes)

    def _failed(self, header: hl7_ack.MessageHeader, exc: Exception) -> bytes:
        if isinstance(exc, DomainError):
            log.warning("mllp message not ingested", extra={"error": type(exc).__name__})
            return self._encode_for(header, hl7_ack.ack_for_failure(f"not stored, send again later: {exc}"))
        log.error("mllp message failed", exc_info=exc)
        return self._encode_for(
            header, hl7_ack.ack_for_failure("not stored, send again later: internal error")
        )

    def _encode(self, message: bytes, ack: hl7_ack.Ack) -> bytes:
        return self._encode_for(hl7_ack.read_header(message), ack)

    def _encode_for(self, header: hl7_ack.MessageHeader, ack: hl7_ack.Ack) -> bytes:
        control_id = f"{self._ack_prefix}{next(self._ack_ids):012x}"
        return hl7_ack.encode_ack(header, ack, control_id, self._facility)
