"""The import rules of `make lint` hold, and the cycle check catches what it should."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_import_cycles", ROOT / "scripts/check_import_cycles.py")
assert spec is not None and spec.loader is not None
cycles = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cycles)


def _graph(edges: list[tuple[str, str]]) -> grimp.ImportGraph:
    graph = grimp.ImportGraph()
    for a, b in edges:
        graph.add_module(a)
        graph.add_module(b)
        graph.add_import(importer=a, imported=b)
    return graph


def test_a_cycle_through_three_modules_is_found_and_a_chain_is_not() -> None:
    chain = _graph([("p.a", "p.b"), ("p.b", "p.c"), ("p.a", "p.c")])
    assert cycles.strongly_connected(chain) == []
    loop = _graph([("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")])
    assert cycles.strongly_connected(loop) == [["p.a", "p.b", "p.c"]]


def test_the_shared_package_and_the_services_have_no_import_cycle() -> None:
    assert cycles.strongly_connected(grimp.build_graph("fibemrss", "services")) == []


def test_the_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_top_level_inference_package_is_installed() -> None:
    assert importlib.util.find_spec("inference") is None
    assert importlib.util.find_spec("fibemrss.api.kserve.v2.grpc_service_pb2") is not None
