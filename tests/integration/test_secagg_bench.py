"""`fibemrss bench secagg --quick`: the real aggregator process with mutual TLS, 4 and 16 hospitals
played through the deployed protocol, with and without dropouts. Checks what the benchmark
claims, not its timings: every round closes with the survivors' exact weighted average, every
stage is measured for the members and the aggregator, and the fits are reported."""

from __future__ import annotations

import json
from pathlib import Path

from fibemrss.tools.bench.secagg_driver import STAGES
from fibemrss.tools.cli import main

PROTOCOL_STAGES = ("advertise", "shares", "upload", "survivors", "reveals")


def test_quick_secagg_bench_sums_exactly_and_measures_every_stage(tmp_path: Path, capsys) -> None:
    out = tmp_path / "secagg.json"
    assert main(["bench", "secagg", "--quick", "--json", str(out), "--workdir", str(tmp_path / "w")]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["params"] == 10_000 and result["hospitals"] == [4, 16]
    assert [(r["hospitals"], r["dropout_rate"]) for r in result["runs"]] == [
        (4, 0.0),
        (4, 0.1),
        (16, 0.0),
        (16, 0.1),
    ]
    assert result["all_sums_exact"] is True and result["rounds_not_closed"] == []
    for run in result["runs"]:
        assert run["round"]["closed"], run["round"]
        assert run["members"]["errors"] == {}
        assert run["round"]["honest_members_left_out"] == []
        # Dropped members shared and never uploaded: the sum is of the others alone, exact.
        assert run["round"]["survivors"] == run["hospitals"] - run["dropped"]
        assert (run["dropped"] > 0) == (run["dropout_rate"] > 0)
        check = run["check"]
        assert check["exact"] is True
        assert check["max_abs_error"] <= check["average_error_bound"]
        assert check["total_weight"] == check["expected_total_weight"]
        stages = run["members"]["per_stage"]
        assert set(stages) == set(STAGES)
        for stage in PROTOCOL_STAGES:
            assert stages[stage]["sent_bytes"]["mean"] > 0, stage
            assert stages[stage]["received_bytes"]["mean"] > 0, stage
            assert stages[stage]["cpu_s"]["mean"] > 0, stage
        assert stages["upload"]["members"] == run["round"]["survivors"]
        assert stages["verify_unmask"]["members"] == 1
        verify = run["verify"]
        assert verify["served"] is True and verify["verified_sum_s"] > 0 and verify["decrypt_s"] >= 0
        assert set(run["aggregator"]["by_window"]) >= {*PROTOCOL_STAGES, "aggregate", "verify_unmask"}
        assert run["aggregator"]["cpu_s"] > 0 and run["aggregator"]["peak_rss_mb"] > 0
        assert run["upload"]["ratio_to_float32"] > 1
    fits = result["fits"]["dropout_0"]
    assert fits["member_cpu_vs_log2n"]["r2"] is not None
    assert fits["aggregator_cpu_vs_nlog2n"]["slope"] is not None
