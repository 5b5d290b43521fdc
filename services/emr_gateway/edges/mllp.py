"""HL7 v2 over MLLP: a listener that ingests each framed message and answers one ACK per message.

Framing is the Minimal Lower Layer Protocol: <VT 0x0B> message <FS 0x1C><CR 0x0D>. A connection
carries any number of messages, answered in order; each one goes through `Gateway.ingest_payload`
("hl7v2"), the same use case as gRPC `Ingest`, so parsing, rules, idempotency and audit exist once.

One asyncio loop serves every connection on its own thread; a slow or stalled sender holds
nothing but its own connection. Ingestion runs in a small worker pool, and the messages that wait
while a batch is written go together into the next one (`Gateway.ingest_messages`: one database
transaction for many senders, with exactly the fates of one-by-one ingestion), so throughput
grows with the number of connections while a lone sender waits for no timer. With
TLS (the default) the client certificate is required and its identity must pass the same
authorization as gRPC `Ingest`; a refused caller gets AR for each message, nothing stored.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fibemrss.domain.errors import DomainError, FieldProblem, InvalidArgument
from fibemrss.platform.authorization import INGEST_METHOD
from fibemrss.platform.tls import peer_identity
from services.emr_gateway.core.answers import hl7_ack
from services.emr_gateway.core.use_cases import Gateway

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
# A message above this is refused and its connection closed: bounds one sender's memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# A connection that sends nothing for this long is closed (interface engines reconnect).
IDLE_TIMEOUT_SECONDS = 600.0
MAX_BATCH = 64  # messages per database batch
BATCHERS = 2  # batches in flight: one is parsed while another waits on the database


@dataclass(frozen=True)
class MllpListen:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None  # None: plaintext, only for an explicitly named local address


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
        self._writers: set[asyncio.StreamWriter] = set()
        self._queue: asyncio.Queue[tuple[bytes, asyncio.Future[bytes]]] | None = None
        self._batchers: list[asyncio.Task[None]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mllp-loop", daemon=True)
        self._server: asyncio.Server | None = None
        self.address = ""

    def start(self) -> MllpServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=30)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        log.info("mllp serving", extra={"mllp": self.address, "tls": self._listen.ssl_context is not None})
        return self

    async def _open(self) -> asyncio.Server:
        self._queue = asyncio.Queue()
        self._batchers = [asyncio.create_task(self._batcher()) for _ in range(BATCHERS)]
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
            for task in self._batchers:
                task.cancel()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)

    # -- one connection ----------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        identity = (
            peer_identity(writer.get_extra_info("ssl_object"), peer)
            if self._listen.ssl_context is not None
            else f"plaintext:{peer}"
        )
        refusal = self._refusal(identity)
        loop = asyncio.get_running_loop()
        self._writers.add(writer)
        try:
            while True:
                message = await self._read_frame(reader)
                if message is None:
                    break
                if refusal:
                    ack = self._encode(message, hl7_ack.ack_refused(refusal))
                else:
                    assert self._queue is not None
                    answer: asyncio.Future[bytes] = loop.create_future()
                    await self._queue.put((message, answer))
                    ack = await answer
                writer.write(START_BLOCK + ack + END_BLOCK)
                await writer.drain()
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.info("mllp connection ended", extra={"peer": str(peer), "reason": type(exc).__name__})
        except asyncio.LimitOverrunError:
            log.warning("mllp message over the size limit; connection closed", extra={"peer": str(peer)})
            writer.write(
                START_BLOCK
                + self._encode(
                    b"",
                    hl7_ack.ack_for_problems(
                        [FieldProblem("message", f"is larger than {MAX_MESSAGE_BYTES} bytes")]
                    ),
                )
                + END_BLOCK
            )
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass

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
            data = await asyncio.wait_for(reader.readuntil(END_BLOCK), IDLE_TIMEOUT_SECONDS)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                log.info("mllp connection closed inside a message", extra={"bytes": len(exc.partial)})
            return None
        start = data.rfind(START_BLOCK)
        return data[start + 1 : -2] if start >= 0 else data[:-2]

    async def _batcher(self) -> None:
        """Takes every message waiting (up to MAX_BATCH), ingests them as one batch, answers each."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty() and len(items) < MAX_BATCH:
                items.append(self._queue.get_nowait())
            acks = await loop.run_in_executor(self._pool, self._handle, [m for m, _ in items])
            for (_, answer), ack in zip(items, acks, strict=True):
                if not answer.done():  # its connection may have gone meanwhile
                    answer.set_result(ack)

    def _handle(self, messages: list[bytes]) -> list[bytes]:
        failure: hl7_ack.Ack | None = None
        try:
            results = self._gateway.ingest_messages("hl7v2", messages)
        except DomainError as exc:
            log.warning("mllp messages not ingested", extra={"error": type(exc).__name__, "n": len(messages)})
            failure = hl7_ack.ack_for_failure(f"not stored, send again later: {exc}")
        except Exception:  # noqa: BLE001 - the senders get AE and resend; the log has the cause
            log.exception("mllp messages failed")
            failure = hl7_ack.ack_for_failure("not stored, send again later: internal error")
        if failure is not None:
            return [self._encode(m, failure) for m in messages]
        acks = []
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, InvalidArgument):
                ack = hl7_ack.ack_for_problems(result.violations)
            else:
                ack = hl7_ack.ack_for_outcomes(result.outcomes)
            acks.append(self._encode(message, ack))
        return acks

    def _encode(self, message: bytes, ack: hl7_ack.Ack) -> bytes:
        return hl7_ack.encode_ack(hl7_ack.read_header(message), ack, uuid.uuid4().hex[:20], self._facility)
