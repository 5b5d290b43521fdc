"""`fibemrss bench round --quick`: the deployed round (a real aggregator process with mutual TLS,
four hospitals through secure aggregation, verified_sum, decryption) at 10,000 parameters. Checks
what the benchmark claims, not its timings: the round closes, the verified and decrypted sum is the
plaintext weighted average, no upload was refused, and every phase and the floor are measured."""

from __future__ import annotations

import json
from pathlib import Path

from fibemrss.tools.bench.round_bench import PHASES
from fibemrss.tools.cli import main


def test_quick_round_bench_runs_the_deployed_protocol_and_sums_exactly(tmp_path: Path, capsys) -> None:
    out = tmp_path / "round.json"
    argv = [
        "bench",
        "round",
        "--quick",
        "--scaling",
        "none",
        "--json",
        str(out),
        "--workdir",
        str(tmp_path / "w"),
    ]
    assert main(argv) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert "mutual TLS" in result["transport"]
    [size] = result["parameter_scaling"]
    assert (size["params"], size["hospitals"]) == (10_000, 4)
    [run] = size["runs"]
    assert run["closed"] and run["failure"] is None
    # The hospital's verified_sum accepted the served sum, and its decryption is the plaintext
    # weighted average of the four hospitals' values (within the codec's rounding).
    assert run["sum_exact"] is True
    assert run["member_errors"] == {} and run["honest_members_left_out"] == []
    assert run["uploads_refused_then_retried"] == 0
    assert set(run["phases_s"]) == set(PHASES)
    assert all(v >= 0 for v in run["phases_s"].values())
    assert run["upload_bytes"] > 4 * 10_000 and run["sum_bytes"] > 0
    floor = size["floor"]
    assert floor["encrypt_s"] > 0 and floor["aggregate_s"] > 0 and floor["total_s"] > 0
    assert size["ratio_to_floor"] is not None and size["goals"]["phase_holding_it"] in PHASES
    assert size["flower"]["note"].startswith("not run")
    assert result["machine"]["load_average_start"] and result["hospital_scaling"]["sizes"] == []
