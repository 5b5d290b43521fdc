"""The round benchmarks' hospitals as processes of their own (issue 24): TenSEAL holds the GIL
while it encrypts, so hospitals played as threads of the bench encrypt one after another. Checks
that up to PROCESS_HOSPITALS_MAX hospitals each really is its own process and that the round they
play is the same deployed round (closed, verified, the exact weighted average, every stage
measured), that threads remain above the cut and on request, that a hospital that cannot start
is named with its reason, and that nothing gRPC is in the fork server the processes come from."""

from __future__ import annotations

import dataclasses
import multiprocessing
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fibemrss.db.embedded import EmbeddedPostgres
from fibemrss.domain.tasks import get_task
from fibemrss.he.keys import load_hospital_key, write_key_files
from fibemrss.platform.config import DEFAULT_TASK
from fibemrss.tools.bench.secagg_driver import (
    FORK_SERVER_PRELOAD,
    PROCESS_HOSPITALS_MAX,
    STAGES,
    MemberSpec,
    ProcessHospitals,
    default_hospitals_as,
    run_one,
)
from fibemrss.tools.certs import init_pki

PARAMS = 10_000


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, EmbeddedPostgres, Path, Path]]:
    work = tmp_path_factory.mktemp("procs")
    keys, pki = work / "keys", work / "pki"
    write_key_files(keys)
    init_pki(pki, ["aggregator@central", "operator@central", *(f"agent@h{i:03d}" for i in range(4))])
    pg = EmbeddedPostgres(work / "postgres")
    pg.start()
    try:
        yield work, pg, keys, pki
    finally:
        pg.stop()


def _round(bench: tuple[Path, EmbeddedPostgres, Path, Path], label: str, hospitals_as: str | None) -> dict:
    work, pg, keys, pki = bench
    key = load_hospital_key((keys / "hospital.he").read_bytes())
    return run_one(work, pg, keys, pki, key, 4, 0.0, PARAMS, 1.0, label=label, hospitals_as=hospitals_as)


def _assert_the_deployed_round(run: dict) -> None:
    assert run["round"]["closed"], run["round"]
    assert run["members"]["errors"] == {} and run["round"]["honest_members_left_out"] == []
    assert run["round"]["survivors"] == 4
    check = run["check"]
    assert check["exact"] is True and check["total_weight"] == check["expected_total_weight"]
    stages = run["members"]["per_stage"]
    assert set(stages) == set(STAGES)
    assert stages["upload"]["members"] == 4 and stages["verify_unmask"]["members"] == 1
    assert stages["upload"]["cpu_s"]["mean"] > 0 and stages["upload"]["thread_cpu_s"]["mean"] > 0
    assert stages["upload"]["sent_bytes"]["mean"] > 4 * PARAMS
    verify = run["verify"]
    assert verify["served"] is True and verify["verified_sum_s"] > 0
    # Each stage closed after the start barrier and in order (members' clocks are the driver's).
    closed_at = list(run["round"]["stage_closed_at_s"].values())
    assert closed_at == sorted(closed_at) and closed_at[0] > 0
    assert run["round"]["wall_with_verify_s"] >= closed_at[-1]


def test_up_to_the_cut_each_hospital_is_a_process_of_its_own(bench) -> None:
    run = _round(bench, "procs", None)
    assert run["hospitals_as"] == "processes"
    # Four processes besides the driver played the four hospitals.
    assert run["members"]["member_processes"] == 4
    _assert_the_deployed_round(run)
    # A process's CPU holds its gRPC threads' beside the member's own thread.
    survivors = run["members"]["survivor_total"]
    assert survivors["cpu_s"]["mean"] >= survivors["thread_cpu_s"]["mean"] > 0


def test_threads_on_request_play_the_same_round_in_the_driver(bench) -> None:
    run = _round(bench, "threads", "threads")
    assert run["hospitals_as"] == "threads"
    assert run["members"]["member_processes"] == 0
    _assert_the_deployed_round(run)


def test_the_cut_and_a_bad_choice() -> None:
    assert default_hospitals_as(PROCESS_HOSPITALS_MAX) == "processes"
    assert default_hospitals_as(PROCESS_HOSPITALS_MAX + 1) == "threads"
    with pytest.raises(ValueError, match="hospitals_as: 'fibers'"):
        run_one(Path("."), None, Path("."), Path("."), None, 4, 0.0, 10, 1.0, hospitals_as="fibers")  # type: ignore[arg-type]


def test_a_hospital_that_cannot_start_is_named_with_its_reason(tmp_path: Path) -> None:
    spec = MemberSpec(
        "h000",
        "127.0.0.1:9",
        tmp_path,
        tmp_path / "missing.he",
        "bench-x",
        frozenset({"h000"}),
        PARAMS,
        100,
        1,
        False,
    )
    task_spec = dataclasses.replace(get_task(DEFAULT_TASK), name="bench-x", sites=("h000",))
    hospitals = ProcessHospitals([spec], task_spec)
    try:
        with pytest.raises(
            RuntimeError, match=r"hospital h000 could not start: FileNotFoundError: .*missing\.he"
        ):
            hospitals.ready()
    finally:
        hospitals.close()
    assert multiprocessing.active_children() == []


def test_the_fork_server_holds_no_grpc() -> None:
    """What the hospitals fork from: a process that imported FORK_SERVER_PRELOAD alone. gRPC's
    threads and channels do not survive a fork, so none of it may be there."""
    code = (
        "import importlib, sys\n"
        f"for name in {list(FORK_SERVER_PRELOAD)!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'grpc_'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
