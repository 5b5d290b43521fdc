"""`fibemrss ingest`: against a running gateway and with a throwaway one, JSON summary on stdout."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fibemrss.tools.commands import ingest as ingest_cli
from tests.conftest import shared_file
from tests.integration.test_gateway_ingest import Gateway, serve_gateway
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
