"""`fibemrss bench round --quick`: the deployed round (a real aggregator process with mutual TLS,
four hospitals through secure aggregation, verified_sum, decryption) at 10,000 parameters. Checks
what the benchmark claims, not its timings: the round closes, the verified and decrypted sum is the
plaintext weighted average, no upload was refused, and every phase and the floor are measured."""

from __future__ import annotations

import json
from pathlib import Path

from fibemrss.tools.bench.round_bench import PHASES
from fibemrss.tools.cli import main
from fibemrss.tools.report.figures import round_hospital_scaling, round_parameter_scaling


def test_quick_round_bench_runs_the_deployed_protocol_and_sums_exactly(tmp_path: Path, capsys) -> None:
    out = tmp_path / "round.json"
    argv = [
        "bench",
        "round",
        "--quick",
        "--scaling",
        "4",
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
    # Hospitals as processes on this machine's cores: between all at once and one after another.
    assert floor["total_s"] <= floor["total_on_this_machine_s"] <= floor["total_with_serial_encryption_s"]
    # Four hospitals: each a process of its own, beside the bench's.
    assert size["hospitals_as"] == ["processes"] and run["hospitals_as"] == "processes"
    assert run["member_processes"] == 4
    assert size["ratio_to_floor"] is not None and size["goals"]["phase_holding_it"] in PHASES
    assert size["flower"]["note"].startswith("not run")
    assert result["machine"]["load_average_start"]
    # Hospital scaling at the same small size, with the aggregator's default pool.
    [scaled] = result["hospital_scaling"]["sizes"]
    assert scaled["hospitals"] == 4 and scaled["closed"] and scaled["sum_exact"] is True
    assert scaled["memory"]["peak_over_idle_mb"] >= 0 and scaled["memory"]["one_upload_mb"] > 0
    assert result["hospital_scaling"]["goals"]["every_round_closed"] is True
    # `fibemrss report` plots both curves from this JSON.
    plots = tmp_path / "plots"
    plots.mkdir()
    for figure in (
        round_parameter_scaling(result, plots, "now"),
        round_hospital_scaling(result, plots, "now"),
    ):
        assert (plots / figure.file).read_bytes().startswith(b"\x89PNG") and "now" in figure.caption
