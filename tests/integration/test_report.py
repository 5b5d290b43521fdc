"""`fibemrss report --from`: real benchmark JSON (small sizes) in, a self-contained HTML page, a
Markdown page and one PNG per figure out; a missing benchmark is named, not fatal."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from fibemrss.domain.tasks import HEART_DISEASE_V1_DP
from fibemrss.tools.bench.curves import run_quality_curves
from fibemrss.tools.bench.he_bench import run_he_bench
from fibemrss.tools.bench.poisoning_bench import quick_config, run_poisoning_bench
from fibemrss.tools.bench.privacy_bench import dp_accuracy
from fibemrss.tools.bench.quality_bench import BenchConfig
from fibemrss.tools.cli import main
from fibemrss.tools.report.build import machine
from tests.conftest import SHARED_DATA

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_report_from_benchmark_json_has_every_figure_inline_and_names_what_is_missing(
    tmp_path: Path, capsys: object
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shared = SHARED_DATA if (SHARED_DATA / "heart_disease").is_dir() else None
    curves = run_quality_curves(shared, seeds=(43, 44), config=BenchConfig(rounds=3))
    curves["measured"] = machine()
    (data / "curves.json").write_text(json.dumps(curves))
    he = {**run_he_bench(20_000), "params": 20_000, "measured": machine()}
    (data / "he.json").write_text(json.dumps(he))
    few_rounds = dataclasses.replace(HEART_DISEASE_V1_DP, rounds=3)
    dp = dp_accuracy(
        shared,
        few_rounds,
        learning_rates=(0.1,),
        clipping_norms=(1.0,),
        epsilons=(1.0, None),
        deltas=(1e-3,),
        split_seeds=(43, 44),
    )
    (data / "privacy.json").write_text(json.dumps({"dp_accuracy": dp, "measured": machine()}))
    poisoning = {**run_poisoning_bench(shared, quick_config()), "measured": machine()}
    (data / "poisoning.json").write_text(json.dumps(poisoning))

    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--from", str(data)]) == 0
    result = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]  # pytest's capsys
    assert len(result["figures"]) == 10  # six from the curves, two from the HE bench, privacy, poisoning
    assert set(result["missing"]) == {"round", "ingest", "inference"}
    page = (out / "report.html").read_text()
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 10
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # one file: no external asset
    for name in result["figures"]:
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG) and len(blob) > 5_000
    md = (out / "REPORT.md").read_text()
    assert md.count("![") == 10 and "round: " in md and "Poisoning (one hostile hospital" in md
    # Captions carry the run's own figures and the machine they were measured on.
    final = curves["final_pooled_test_accuracy"]["fedyogi_encrypted"]["mean"]
    assert f"{final:.3f}" in page and f"{machine()['cores']} cores" in page
    # The privacy figure's caption carries the run's accuracy at epsilon 1 and FLamby's metric.
    at_1 = next(r for r in dp["results"] if r["epsilon_target"] == 1.0)
    assert f"pooled {at_1['pooled_test_accuracy']['mean']:.3f}" in page
    assert "mean over the 4 centers" in page
