"""Private keys are created 0600 in one step and never written through a symbolic link that
someone with write access to the folder planted (it would put the key where they can read it)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fibemrss.he.keys import write_key_files
from fibemrss.tools.certs import init_pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_certificate_keys_and_he_keys_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        paths = init_pki(tmp_path / "pki", ["agent@a"])
        write_key_files(tmp_path / "keys")
    finally:
        os.umask(old)
    assert _mode(paths["agent@a"].key) == 0o600
    assert _mode(tmp_path / "pki" / "ca.key") == 0o600
    assert _mode(tmp_path / "keys" / "hospital.he") == 0o600
    assert _mode(tmp_path / "keys" / "aggregator.he") == 0o600


def test_a_planted_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "attacker-readable"
    target.write_text("")
    target.chmod(0o644)
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "agent@a.key").symlink_to(target)
    with pytest.raises(FileExistsError, match="symbolic link"):
        init_pki(pki, ["agent@a"])
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "hospital.he").symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError):
            write_key_files(keys, overwrite=overwrite)
    assert target.read_text() == "" and _mode(target) == 0o644


def test_a_new_ceremony_replaces_keys_in_place_with_fresh_files(tmp_path: Path) -> None:
    first = init_pki(tmp_path, ["agent@a"])["agent@a"].key.read_bytes()
    second_paths = init_pki(tmp_path, ["agent@a"])
    assert second_paths["agent@a"].key.read_bytes() != first
    assert _mode(second_paths["agent@a"].key) == 0o600
    write_key_files(tmp_path / "k")
    write_key_files(tmp_path / "k", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["aggregator.he", "hospital.he"]
