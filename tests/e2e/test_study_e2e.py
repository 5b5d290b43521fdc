"""Studies from documents alone: a FHIR study (hypertension on the shared Synthea bundles) runs end
to end through the gateways, encrypted, and serves a reference; a study's cohort bounds what the
gateways export; a service refuses a document that contradicts the study it was named for."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from fibemrss.domain.tasks import TASKS
from fibemrss.tools.demo import run_demo
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.e2e
STUDIES = resources.files("fibemrss.domain") / "studies"


@pytest.mark.skipif(not (SHARED_DATA / "fhir_r4").is_dir(), reason="../shared/data/fhir_r4 is not here")
def test_the_synthea_hypertension_study_trains_from_fhir_through_the_gateways_and_serves(
    tmp_path: Path,
) -> None:
    study = tmp_path / "hypertension.yaml"
    study.write_bytes((STUDIES / "hypertension-synthea-v1.yaml").read_bytes())
    task = TASKS["hypertension-synthea-v1"]
    result = run_demo(tmp_path / "work", None, tmp_path / "out.json", quiet=True, study_file=study)
    assert [r["round"] for r in result.rounds] == list(range(1, task.rounds + 1))
    assert result.diagnosis["model"] == task.name
    assert result.diagnosis["model_version"] == task.rounds
    assert {c["feature"] for c in result.diagnosis["top_contributions"]} <= {f.name for f in task.features}
    assert json.loads((tmp_path / "out.json").read_text())["diagnosis"]["patient_key"]


def test_a_service_given_a_document_that_contradicts_its_study_name_stops_with_one_line(
    tmp_path: Path,
) -> None:
    study = tmp_path / "s.yaml"
    study.write_bytes((STUDIES / "heart-disease-noninvasive-v1.yaml").read_bytes())
    env = {
        "FIBEMRSS_STUDY_FILE": str(study),
        "FIBEMRSS_TASK": "heart-disease-v1",
        "FIBEMRSS_HOSPITAL": "h",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "FIBEMRSS_HE_CONTEXT": str(tmp_path / "none.he"),
        "FIBEMRSS_GATEWAY": "127.0.0.1:1",
        "FIBEMRSS_AGGREGATOR": "127.0.0.1:1",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.hospital_agent"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert (
        "FIBEMRSS_TASK is 'heart-disease-v1' but FIBEMRSS_STUDY_FILE holds 'heart-disease-noninvasive-v1'"
        in done.stderr
    )
    study.write_text("study: Bad Name\nversion: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "services.hospital_agent"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "FIBEMRSS_STUDY_FILE: invalid study document: study " in done.stderr
    assert "Traceback" not in done.stderr
