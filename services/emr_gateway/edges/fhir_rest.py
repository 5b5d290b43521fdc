"""FHIR R4 REST on the gateway (Starlette): batch/transaction Bundles, single resources, metadata,
and a bulk NDJSON import with a status URL to poll.

A thin adapter: every request goes to `Gateway.ingest_fhir_bundles`, the FHIR use case whose
parser, rules, idempotency and audit the gRPC `Ingest` uses too, and every answer is built by
`fhir_outcomes`. Callers are authorized by `fibemrss.platform.authorization` with the name of
the gRPC method they stand for (ingesting is `Ingest`).

Bulk import follows the Bulk Data asynchronous request pattern: `POST [base]/$import` with an
NDJSON body (`application/fhir+ndjson`) answers 202 with `Content-Location:
[base]/$import-status/<id>`; polling that answers 202 with `X-Progress` while it runs, then 200
with a manifest whose `output` names the per-line outcomes (one OperationOutcome per line, NDJSON,
`id` = `line-<n>`). Jobs live in the gateway's memory: a restart forgets them, not the records.

An import is streamed, never held whole: its body is spooled to a temporary file as it arrives,
indexed line by line (`fhir_ndjson.index_lines`), then read back a batch of patient groups at a
time, each batch written as one transaction; the per-line outcomes go to a second temporary file,
served in line order. Memory is a multiple of the largest batch, not of the body (`fibemrss bench
gateway-memory`). A crash mid-import leaves the batches already committed stored and nothing of
the others; sending the import again stores the rest, the stored ones answered `duplicate`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import uuid
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fibemrss.domain.errors import FieldProblem, InvalidArgument, NotFound, ResourceExhausted
from fibemrss.domain.normalize.fhir_r4 import MAPPED_TYPES, read_json
from fibemrss.platform.authorization import INGEST_METHOD
from fibemrss.platform.http_server import Handler, guarded, http_status_for, request_identity
from services.emr_gateway.core.answers import fhir_outcomes as fo
from services.emr_gateway.core.parsers.fhir_ndjson import (
    LineGroup,
    LineIndex,
    LineProblem,
    batches,
    index_lines,
    read_group,
)
from services.emr_gateway.core.use_cases import BundleIngest, Gateway

log = logging.getLogger(__name__)

Authorize = Callable[[str, str], None]
FHIR_JSON = "application/fhir+json"
READ_METHOD = "/fibemrss.emr.v1.EmrGatewayService/GetIngestStats"
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_IMPORT_BYTES = 512 * 1024 * 1024
# Lines of one import, counted as the body arrives (one more is 400 on `body`, nothing stored): the
# import holds 24 bytes a resource line and 16 an outcome in memory, and writes one outcome per
# line to disk, so junk lines of 2 bytes cannot make 512 MiB cost gigabytes. A bulk export of
# 512 MiB has well under a million lines (Synthea: 3.3 KB a line).
MAX_IMPORT_LINES = 2_000_000
GROUPS_PER_WRITE = 200  # patient groups per database batch of an import, at most
BATCH_BYTES = 4 * 1024 * 1024  # NDJSON lines per database batch of an import, about (one group may be more)
MAX_JOBS = 100  # finished jobs kept for polling; the oldest are forgotten first
# Imports accepted and not finished (each holds its body, up to MAX_IMPORT_BYTES, on disk until it
# runs): one more is refused with 429 before its body is read, so queued bodies stay bounded.
MAX_PENDING_IMPORTS = 2


def fhir_response(doc: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")), status, headers, media_type=FHIR_JSON)


def error_response(exc: BaseException, root: str = "Bundle") -> Response:
    status = http_status_for(exc)
    if status == 500:
        log.error("fhir request failed", exc_info=exc)
        return fhir_response(
            fo.message_outcome("fatal", "exception", "internal error; see the server log"), 500
        )
    if isinstance(exc, InvalidArgument) and exc.violations:
        return fhir_response(fo.problems_outcome(exc.violations, root), status)
    code = {401: "login", 403: "forbidden", 404: "not-found", 429: "throttled", 503: "transient"}.get(
        status, "processing"
    )
    return fhir_response(fo.message_outcome("error", code, str(exc)), status)


@dataclass
class ImportJob:
    id: str
    request: str
    started: str
    lines: int = 0
    done_lines: int = 0
    finished: bool = False
    failed: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    # One OperationOutcome per line (NDJSON) in a temporary file, in the order they were decided;
    # `outcome_at[line]` is its offset + 1 there (0: none), `outcome_length[line]` its length.
    outcome_file: IO[bytes] = field(
        default_factory=lambda: tempfile.TemporaryFile(prefix="fibemrss-outcomes-")
    )
    outcome_at: array[int] = field(default_factory=lambda: array("q"))
    outcome_length: array[int] = field(default_factory=lambda: array("q"))
    outcome_count: int = 0

    def close(self) -> None:
        self.outcome_file.close()

    def outcome_lines(self) -> Iterator[bytes]:
        """The outcomes in line order, read back from the file (the job is finished)."""
        fd = self.outcome_file.fileno()
        for line in range(len(self.outcome_at)):
            if at := self.outcome_at[line]:
                # pread: two readers of the same job never move each other's position
                yield os.pread(fd, self.outcome_length[line], at - 1)


class FhirRest:
    def __init__(
        self,
        gateway: Gateway,
        authorize: Authorize | None,
        base_path: str = "/fhir",
        max_pending_imports: int = MAX_PENDING_IMPORTS,
        max_import_lines: int = MAX_IMPORT_LINES,
    ) -> None:
        self._max_pending = max_pending_imports
        self._max_lines = max_import_lines
        self._gateway = gateway
        self._authorize = authorize
        self._base = base_path
        self._jobs: dict[str, ImportJob] = {}
        self._jobs_lock = threading.Lock()
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fhir-import")

    def routes(self) -> list[Route]:
        b, h = self._base, self._handler
        return [
            Route(f"{b}/metadata", h(READ_METHOD, self._metadata), methods=["GET"]),
            Route(b, h(INGEST_METHOD, self._bundle), methods=["POST"]),
            Route(b + "/", h(INGEST_METHOD, self._bundle), methods=["POST"]),  # as clients join URLs
            Route(b + "/$import", h(INGEST_METHOD, self._import), methods=["POST"]),
            Route(b + "/$import-status/{job}", h(INGEST_METHOD, self._import_status), methods=["GET"]),
            Route(
                b + "/$import-status/{job}/outcomes.ndjson",
                h(INGEST_METHOD, self._import_outcomes),
                methods=["GET"],
            ),
            Route(b + "/{type}", h(INGEST_METHOD, self._resource), methods=["POST"]),
        ]

    def close(self) -> None:
        self._runner.shutdown(wait=True, cancel_futures=True)

    def _handler(self, method: str, handle: Handler) -> Handler:
        return guarded(
            self._authorize,
            method,
            handle,
            lambda exc, request: error_response(exc, request.path_params.get("type", "Bundle")),
        )

    def _base_url(self, request: Request) -> str:
        return str(request.base_url).rstrip("/") + self._base

    # -- metadata --------------------------------------------------------------------------------
    async def _metadata(self, request: Request) -> Response:
        return fhir_response(
            fo.capability_statement(self._base_url(request), datetime.now(UTC).date().isoformat())
        )

    # -- batch / transaction ---------------------------------------------------------------------
    async def _bundle(self, request: Request) -> Response:
        bundle = _read_json(await _body(request, MAX_BUNDLE_BYTES))
        kind = bundle.get("type") if isinstance(bundle, dict) else None
        if kind not in ("batch", "transaction"):
            raise InvalidArgument(
                "not a batch or transaction",
                [FieldProblem("type", "POST [base] takes a batch or transaction Bundle")],
            )
        result = (await run_in_threadpool(self._gateway.ingest_fhir_bundles, [bundle]))[0]
        if isinstance(result, InvalidArgument):
            raise result  # a transaction with a bad entry, or no readable Bundle: nothing stored
        entries = bundle.get("entry") or []
        outcomes = fo.entry_outcomes(entries, result.parsed, result.outcomes)
        return fhir_response(fo.response_bundle(kind, outcomes))

    # -- one resource ----------------------------------------------------------------------------
    async def _resource(self, request: Request) -> Response:
        rtype = request.path_params["type"]
        resource = _read_json(await _body(request, MAX_BUNDLE_BYTES))
        if rtype == "Consent":
            return await self._consent(request, resource)
        if rtype not in MAPPED_TYPES:
            raise NotFound(
                f"resource type {rtype[:40]} is not ingested here (mapped: {', '.join(MAPPED_TYPES)})"
            )
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            raise InvalidArgument("wrong resource", [FieldProblem("resourceType", f"must be {rtype!r}")])
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": resource}]}
        result = (await run_in_threadpool(self._gateway.ingest_fhir_bundles, [bundle]))[0]
        if isinstance(result, InvalidArgument):
            raise result
        outcome = fo.entry_outcomes(bundle["entry"], result.parsed, result.outcomes, root=rtype)[0]
        status = int(outcome.status.split()[0])
        if outcome.fate == "not mapped":
            status = 422
        headers = {"Location": outcome.location} if outcome.location else None
        return fhir_response(outcome.outcome, status, headers)

    async def _consent(self, request: Request, resource: Any) -> Response:
        actor = request_identity(request.scope)
        key, stored = await run_in_threadpool(self._gateway.record_consent, actor, resource)
        decision = resource.get("provision", {}).get("type") if isinstance(resource, dict) else ""
        text = (
            f"research use {decision}: recorded for patient {key}"
            if stored == "accepted"
            else ("already recorded: nothing changed")
        )
        code = "informational" if stored == "accepted" else "duplicate"
        return fhir_response(
            fo.message_outcome("information", code, text), 201 if stored == "accepted" else 200
        )

    # -- bulk NDJSON import ----------------------------------------------------------------------
    def _check_pending(self) -> None:
        """Under `_jobs_lock`: refuses one more import while the most allowed are unfinished."""
        pending = sum(1 for j in self._jobs.values() if not j.finished)
        if pending >= self._max_pending:
            raise ResourceExhausted(
                f"{pending} imports are still running (at most {self._max_pending} at once): "
                "poll their status and send this one again later"
            )

    async def _import(self, request: Request) -> Response:
        with self._jobs_lock:
            self._check_pending()  # before reading a body that would only wait
        # Spooled to disk as it arrives: an import of 512 MiB costs its chunks in memory, not itself.
        body = tempfile.TemporaryFile(prefix="fibemrss-import-")
        try:
            size = lines = 0
            last = b"\n"
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_IMPORT_BYTES:
                    raise InvalidArgument(
                        "import too large", [FieldProblem("body", f"over {MAX_IMPORT_BYTES} bytes")]
                    )
                lines += chunk.count(b"\n")
                last = chunk[-1:] or last
                if lines + (last != b"\n") > self._max_lines:
                    raise InvalidArgument(
                        "import too long",
                        [
                            FieldProblem(
                                "body",
                                f"more than {self._max_lines} lines: send the export as several imports",
                            )
                        ],
                    )
                try:
                    await run_in_threadpool(body.write, chunk)
                except OSError as exc:  # the temporary directory is full (a small emptyDir)
                    raise ResourceExhausted(
                        f"no room to hold the import in the gateway's temporary directory ({exc.strerror}): "
                        "send it again later or in smaller parts"
                    ) from None
            job = ImportJob(uuid.uuid4().hex, str(request.url), datetime.now(UTC).isoformat())
            with self._jobs_lock:
                self._check_pending()  # again: others may have been accepted while this body arrived
                self._jobs[job.id] = job
                while len(self._jobs) > MAX_JOBS:
                    oldest = next(iter(self._jobs))
                    if not self._jobs[oldest].finished:
                        break
                    self._jobs.pop(oldest).close()
        except BaseException:
            body.close()
            raise
        self._runner.submit(self._run_import, job, body)
        status_url = f"{self._base_url(request)}/$import-status/{job.id}"
        return fhir_response(
            fo.message_outcome("information", "informational", f"import accepted; poll {status_url}"),
            202,
            {"Content-Location": status_url},
        )

    def _run_import(self, job: ImportJob, body: IO[bytes]) -> None:
        """Pass 1 indexes the spooled lines (an unreadable line gets its outcome at once); pass 2
        reads back and ingests a batch of patient groups at a time, one transaction each."""
        try:
            body.seek(0)

            def rejected_line(p: LineProblem) -> None:
                self._record(job, p.line, "rejected", fo.problems_outcome([p.problem], "Resource"))

            index: LineIndex = index_lines(body, rejected_line)
            job.lines = index.lines

            def read(offset: int, length: int) -> bytes:
                body.seek(offset)
                return body.read(length)

            for batch in batches(index, GROUPS_PER_WRITE, BATCH_BYTES):
                groups = [read_group(index, positions, read) for positions in batch]
                results = self._gateway.ingest_fhir_bundles([g.bundle() for g in groups])
                for group, result in zip(groups, results, strict=True):
                    self._record_group(job, group, result)
        except Exception as exc:  # noqa: BLE001 - the job reports it; the log has the cause
            log.exception("fhir import failed")
            job.failed = "internal error; see the server log" if http_status_for(exc) == 500 else str(exc)
        finally:
            body.close()
            job.outcome_file.flush()  # before anyone reads it
            job.finished = True

    def _record_group(self, job: ImportJob, group: LineGroup, result: BundleIngest | InvalidArgument) -> None:
        if isinstance(result, InvalidArgument):
            for line in group.lines:
                self._record(job, line, "rejected", fo.problems_outcome(result.violations, "Resource"))
            return
        entries = [{"resource": r} for r in group.resources]
        for line, resource, e in zip(
            group.lines,
            group.resources,
            fo.entry_outcomes(entries, result.parsed, result.outcomes),
            strict=True,
        ):
            root = resource.get("resourceType", "Resource")
            outcome = _rooted(e.outcome, root, e.index)
            self._record(job, line, e.fate, outcome)

    def _record(self, job: ImportJob, line: int, fate: str, outcome: dict[str, Any]) -> None:
        outcome = {**outcome, "id": f"line-{line}"}
        outcome["issue"] = [
            {**i, "diagnostics": f"line {line}: {i.get('diagnostics', '')}"} for i in outcome["issue"]
        ]
        text = (json.dumps(outcome, separators=(",", ":")) + "\n").encode()
        if line >= len(job.outcome_at):
            grow = max(line + 1, 2 * len(job.outcome_at)) - len(job.outcome_at)
            job.outcome_at.extend(array("q", bytes(8 * grow)))
            job.outcome_length.extend(array("q", bytes(8 * grow)))
        job.outcome_file.seek(0, 2)
        job.outcome_at[line] = job.outcome_file.tell() + 1
        job.outcome_length[line] = len(text)
        job.outcome_file.write(text)
        job.outcome_count += 1
        job.counts[fate] = job.counts.get(fate, 0) + 1
        job.done_lines += 1

    def _job(self, request: Request) -> ImportJob:
        with self._jobs_lock:
            job = self._jobs.get(request.path_params["job"])
        if job is None:
            raise NotFound("no such import job (jobs are kept in memory until the gateway restarts)")
        return job

    async def _import_status(self, request: Request) -> Response:
        job = self._job(request)
        if not job.finished:
            progress = f"{job.done_lines} of {job.lines or '?'} lines"
            return Response(status_code=202, headers={"X-Progress": progress, "Retry-After": "1"})
        if job.failed:
            return fhir_response(fo.message_outcome("error", "exception", job.failed), 500)
        errors = job.counts.get("rejected", 0)
        manifest = {
            "transactionTime": job.started,
            "request": job.request,
            "requiresAccessToken": False,
            "output": [
                {
                    "type": "OperationOutcome",
                    "url": f"{self._base_url(request)}/$import-status/{job.id}/outcomes.ndjson",
                    "count": job.outcome_count,
                }
            ],
            "error": [],
            "extension": {"lines": job.lines, "fates": dict(sorted(job.counts.items())), "rejected": errors},
        }
        return Response(json.dumps(manifest), 200, media_type="application/json")

    async def _import_outcomes(self, request: Request) -> Response:
        job = self._job(request)
        if not job.finished:
            return Response(
                status_code=202, headers={"X-Progress": f"{job.done_lines} lines", "Retry-After": "1"}
            )
        # Read from the job's file a line at a time, off the event loop.
        return StreamingResponse(
            iterate_in_threadpool(job.outcome_lines()), media_type="application/fhir+ndjson"
        )


def _rooted(outcome: dict[str, Any], root: str, index: int) -> dict[str, Any]:
    """An import line's outcome with expressions from its resource ("Observation.valueQuantity")
    rather than from the bundle the import built around it."""
    prefix = f"Bundle.entry[{index}].resource"
    issues = []
    for i in outcome["issue"]:
        i = dict(i)
        if "expression" in i:
            i["expression"] = [
                root + e.removeprefix(prefix) if e.startswith(prefix) else e for e in i["expression"]
            ]
        issues.append(i)
    return {**outcome, "issue": issues}


async def _body(request: Request, limit: int) -> bytes:
    body = await request.body()
    if len(body) > limit:
        raise InvalidArgument("request too large", [FieldProblem("body", f"over {limit} bytes")])
    return body


def _read_json(body: bytes) -> Any:
    return read_json(body)  # ParseError (InvalidArgument) naming "$" for anything but JSON
