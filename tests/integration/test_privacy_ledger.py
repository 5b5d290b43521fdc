"""The privacy ledger in a real hospital database: spends recorded and audited, a budget the
agent enforces, and a refusal that survives a restart; `fibemrss privacy ledger` shows it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from fibemrss.db.pool import Database
from fibemrss.db.privacy_ledger import PrivacyLedger
from fibemrss.domain.privacy import total
from fibemrss.domain.privacy_accounting import epsilon_after_rounds
from fibemrss.domain.tasks import HEART_DISEASE_V1, HEART_DISEASE_V1_DP
from fibemrss.tools.cli import main
from services.hospital_agent.core.privacy_guard import BudgetExceeded, PrivacyGuard

FEDERATION = b"\x07" * 16


def test_the_agent_refuses_a_round_beyond_the_budget_and_still_after_a_restart(
    fresh_database, capsys
) -> None:
    url = fresh_database("hospital")
    db = Database(url)
    try:
        ledger = PrivacyLedger(db)
        ledger.set_budget("emr", 0.5, 1e-2, actor="operator:test")
        task, dp = HEART_DISEASE_V1_DP, HEART_DISEASE_V1_DP.dp
        assert dp is not None
        guard = PrivacyGuard("cleveland", task, "emr", ledger)
        guard.before_round(FEDERATION, 0)  # the noised dataset size: 1/8
        allowed = 0
        with pytest.raises(BudgetExceeded, match="beyond its budget of epsilon 0.5") as refused:
            for r in range(1, task.rounds + 1):
                guard.before_round(FEDERATION, r)
                allowed = r
        # Allowed exactly as long as 1/8 + epsilon(rounds) stays within 0.5.
        assert (
            1 / 8 + epsilon_after_rounds(task, dp, allowed)
            <= 0.5
            < 1 / 8 + epsilon_after_rounds(task, dp, allowed + 1)
        )
        assert f"round {allowed + 1}" in str(refused.value)
        spent_eps, spent_delta = total(ledger.latest("emr"))
        assert spent_eps == pytest.approx(1 / 8 + epsilon_after_rounds(task, dp, allowed))
        assert spent_delta == dp.target_delta

        # A restarted agent (a new guard over the same database) refuses the same round.
        with pytest.raises(BudgetExceeded):
            PrivacyGuard("cleveland", task, "emr", PrivacyLedger(db)).before_round(FEDERATION, allowed + 1)
        # Training without DP is an unbounded spend: refused outright under any budget.
        plain = PrivacyGuard("cleveland", HEART_DISEASE_V1, "emr", ledger)
        with pytest.raises(BudgetExceeded, match="epsilon inf"):
            plain.before_round(b"\x08" * 16, 1)
        # Without a budget it is recorded, as it is.
        other = PrivacyGuard(
            "cleveland", dataclasses.replace(HEART_DISEASE_V1, name="t2"), "other-data", ledger
        )
        other.before_round(b"\x09" * 16, 1)
        assert math.isinf(total(ledger.latest("other-data"))[0])

        with db.transaction() as cur:
            cur.execute(
                "SELECT count(*) FROM audit_log WHERE action='privacy_spend' AND actor='agent@cleveland'"
            )
            # The DP rounds and the dataset size; for the other dataset its size and the unbounded round.
            assert cur.fetchone()[0] == allowed + 1 + 2
    finally:
        db.close()

    assert main(["privacy", "ledger", "--database-url", url, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["emr"]["budget"] == {"epsilon": 0.5, "delta": 0.01}
    assert shown["emr"]["spent"]["epsilon"] == pytest.approx(spent_eps)
    assert [e["kind"] for e in shown["emr"]["entries"]] == ["dataset-size"] + ["dp-sgd"] * allowed
    assert shown["other-data"]["spent"]["epsilon"] == "inf"
    assert main(["privacy", "budget", "--database-url", url, "--dataset", "emr", "--epsilon", "8"]) == 0
    capsys.readouterr()
    db = Database(url)
    try:
        PrivacyGuard("cleveland", task, "emr", PrivacyLedger(db)).before_round(FEDERATION, allowed + 1)
    finally:
        db.close()
    assert main(["privacy", "ledger", "--database-url", url]) == 0
    assert "budget epsilon 8" in capsys.readouterr().out
