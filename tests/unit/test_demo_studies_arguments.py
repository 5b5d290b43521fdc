"""`fibemrss demo` with several studies: a bad list stops with one line before any service starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fibemrss.tools.cli import main


def test_a_study_given_twice_or_unknown_is_one_line_and_nothing_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "work"
    twice = ["demo", "--study", "heart-disease-v1", "--study", "heart-disease-v1", "--workdir", str(workdir)]
    assert main(twice) == 1
    assert "fibemrss: study heart-disease-v1 is given twice" in capsys.readouterr().err
    unknown = ["demo", "--study", "heart-disease-v1", "--study", "no-such-study", "--workdir", str(workdir)]
    assert main(unknown) == 1
    assert "unknown task 'no-such-study'" in capsys.readouterr().err
    assert not (workdir / "pki").exists()  # no cluster was started


def test_the_pair_flag_and_study_are_not_given_together(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--study or --heart-and-hypertension, not both"):
        main(["demo", "--heart-and-hypertension", "--study", "heart-disease-v1", "--workdir", str(tmp_path)])
