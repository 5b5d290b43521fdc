"""Model versions in a real hospital database: retiring one stops serving it; the newest rolls back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fibemrss.db.model_store import ModelStore
from fibemrss.db.pool import Database
from fibemrss.domain.errors import FailedPrecondition, NotFound
from fibemrss.domain.tasks import HEART_DISEASE_V1
from fibemrss.tools.bench.inference_bench import sample_model_version
from services.inference.model_cache import ModelCache

TASK = HEART_DISEASE_V1.name


@pytest.fixture
def store(fresh_database):
    url = fresh_database("hospital")
    db = Database(url)
    store = ModelStore(db)
    for v in (1, 2, 3):
        assert store.publish(sample_model_version(version=v, seed=v), actor="agent@test")
    yield url, db, store
    db.close()


def test_retiring_the_newest_version_rolls_inference_back_and_a_pin_to_it_is_not_found(store) -> None:
    url, db, models = store
    cache = ModelCache(models, HEART_DISEASE_V1, poll_seconds=60)
    cache.refresh()
    assert cache.get().version == 3 and cache.get(1).version == 1
    assert cache.versions() == [3, 2, 1]
    models.retire(TASK, 3, actor="operator@test", reason="drifted on local validation")
    models.retire(TASK, 3, actor="operator@test", reason="again")  # a repeat changes nothing
    cache.refresh()
    assert cache.get().version == 2
    assert cache.versions() == [2, 1]
    with pytest.raises(NotFound, match="retired"):
        cache.get(3)
    with db.transaction() as cur:
        cur.execute("SELECT actor, purpose, subject FROM audit_log WHERE action='retire_model'")
        assert cur.fetchall() == [("operator@test", "drifted on local validation", f"{TASK}@3")]


def test_the_last_servable_version_cannot_be_retired(store) -> None:
    _, _, models = store
    models.retire(TASK, 1, actor="op", reason="r")
    models.retire(TASK, 2, actor="op", reason="r")
    with pytest.raises(FailedPrecondition):
        models.retire(TASK, 3, actor="op", reason="r")
    with pytest.raises(NotFound):
        models.retire(TASK, 9, actor="op", reason="r")
    assert models.servable_versions(TASK) == [3]


def test_models_cli_lists_and_retires(store) -> None:
    url, _, _ = store
    cli = [sys.executable, "-m", "fibemrss.tools.cli", "models"]
    retire = subprocess.run(
        [*cli, "retire", "--database-url", url, "--version", "2", "--reason", "bad calibration"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert retire.returncode == 0, retire.stderr
    listing = subprocess.run(
        [*cli, "list", "--database-url", url], capture_output=True, text=True, timeout=60
    )
    import json

    rows = {r["version"]: r for r in json.loads(listing.stdout)}
    assert rows[2]["retired"] and rows[2]["retire_reason"] == "bad calibration"
    assert rows[3]["retired"] is None and rows[1]["retired"] is None
    last = subprocess.run(
        [*cli, "retire", "--database-url", url, "--version", "7", "--reason", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert last.returncode == 1 and "Traceback" not in last.stderr and "version 7" in last.stderr
