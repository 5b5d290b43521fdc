"""FIBEMRSS_STUDIES: which studies a hospital's agent and inference service work on, and the
one-line errors of a bad list (each names the variable and the item)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fibemrss.domain.errors import ConfigError
from fibemrss.platform.config import studies_from_env

SHIPPED = Path(__file__).resolve().parents[2] / "fibemrss" / "domain" / "studies"


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FIBEMRSS_STUDIES", "FIBEMRSS_TASK", "FIBEMRSS_STUDY_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_unset_is_the_one_study_of_fibemrss_task_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [t.name for t in studies_from_env().named] == ["heart-disease-v1"]
    monkeypatch.setenv("FIBEMRSS_TASK", "hypertension-synthea-v1")
    selection = studies_from_env()
    assert [t.name for t in selection.named] == ["hypertension-synthea-v1"] and not selection.approved


def test_names_files_and_approved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FIBEMRSS_STUDIES",
        f"heart-disease-v1, {SHIPPED / 'hypertension-synthea-v1.yaml'},approved",
    )
    selection = studies_from_env()
    assert [t.name for t in selection.named] == ["heart-disease-v1", "hypertension-synthea-v1"]
    assert selection.approved
    monkeypatch.setenv("FIBEMRSS_STUDIES", "approved")
    assert studies_from_env().named == () and studies_from_env().approved


@pytest.mark.parametrize(
    ("value", "task", "message"),
    [
        ("no-such-study", "", "FIBEMRSS_STUDIES: unknown task 'no-such-study'"),
        ("/nowhere/study.yaml", "", "FIBEMRSS_STUDIES: cannot read /nowhere/study.yaml"),
        (" , ", "", "FIBEMRSS_STUDIES: names no study"),
        (
            "heart-disease-v1",
            "hypertension-synthea-v1",
            "FIBEMRSS_TASK is 'hypertension-synthea-v1' but FIBEMRSS_STUDIES does not list it",
        ),
    ],
)
def test_a_bad_list_stops_with_one_line_naming_the_item(
    monkeypatch: pytest.MonkeyPatch, value: str, task: str, message: str
) -> None:
    monkeypatch.setenv("FIBEMRSS_STUDIES", value)
    if task:
        monkeypatch.setenv("FIBEMRSS_TASK", task)
    with pytest.raises(ConfigError) as error:
        studies_from_env()
    assert message in str(error.value)


def test_an_invalid_document_names_its_bad_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: 1\nstudy: bad-one\nversion: 1\n")
    monkeypatch.setenv("FIBEMRSS_STUDIES", str(bad))
    with pytest.raises(ConfigError, match=r"FIBEMRSS_STUDIES: .*bad.yaml: .*features"):
        studies_from_env()
