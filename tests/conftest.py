"""Shared fixtures: a real PostgreSQL server (embedded, or DATABASE_URL) and the shared data folder."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a running PostgreSQL server, started once per test session."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    from fibemrss.db.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    pg.start()
    try:
        yield pg.url("postgres")
    finally:
        pg.stop()
        # The session's databases take gigabytes and pytest keeps its last three temp folders: a
        # machine that runs the suite again and again (CI, a developer) fills its disk otherwise.
        shutil.rmtree(pg.data_dir, ignore_errors=True)


@pytest.fixture
def fresh_database(postgres_server: str) -> Callable[[str], str]:
    """Creates an empty, migrated database for one test and returns its URL."""
    from fibemrss.db.admin import ensure_database
    from fibemrss.db.migrate import migrate

    def make(schema: str) -> str:
        url = ensure_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")
        migrate(url, schema)
        return url

    return make


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared real-data folder is not beside this checkout")
    return path
