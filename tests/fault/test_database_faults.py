"""The database under fault: an exhausted pool, a lock held past the lock timeout, a PostgreSQL
crash and restart. Callers see UNAVAILABLE (retry), never INTERNAL, and the pool reconnects."""

from __future__ import annotations

import stat
from pathlib import Path

import psycopg2
import pytest

from fibemrss.db.embedded import EmbeddedPostgres
from fibemrss.db.pool import Database, Timeouts
from fibemrss.domain.errors import Unavailable
from fibemrss.platform.status_mapping import status_for


def test_an_exhausted_pool_is_unavailable_not_internal(fresh_database) -> None:  # type: ignore[no-untyped-def]
    db = Database(fresh_database("aggregator"), max_connections=1)
    try:
        with db.transaction() as cur:
            cur.execute("SELECT 1")
            with pytest.raises(Unavailable) as info, db.transaction():
                pass
        assert status_for(info.value).code == 14  # UNAVAILABLE
        with db.transaction() as cur:  # the slot came back
            cur.execute("SELECT 1")
    finally:
        db.close()


def test_a_lock_held_past_the_lock_timeout_is_unavailable(fresh_database) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database("aggregator")
    holder = psycopg2.connect(url)
    db = Database(url, timeouts=Timeouts(lock_ms=200))
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE federations IN ACCESS EXCLUSIVE MODE")  # held until rollback
        with pytest.raises(Unavailable, match="busy"), db.transaction() as cur:
            cur.execute("SELECT count(*) FROM federations")
        holder.rollback()
        with db.transaction() as cur:
            cur.execute("SELECT count(*) FROM federations")
    finally:
        holder.close()
        db.close()


def test_after_a_postgresql_crash_and_restart_the_pool_reconnects(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    try:
        url = pg.create_database("faults")
        db = Database(url, max_connections=2)
        with db.transaction() as cur:
            cur.execute("CREATE TABLE t (x int)")
            cur.execute("INSERT INTO t VALUES (1)")
        pg.stop(mode="immediate")  # every server process killed, as a crash
        with pytest.raises(Unavailable), db.transaction() as cur:
            cur.execute("SELECT 1")
        pg.start()
        seen: list[int] = []
        for _ in range(3):  # a connection that died with the old server is dropped on first use
            try:
                with db.transaction() as cur:
                    cur.execute("SELECT x FROM t")
                    seen.append(cur.fetchone()[0])
                    break
            except Unavailable:
                continue
        assert seen == [1]  # the committed row survived the crash
        db.close()
    finally:
        pg.stop()


def test_the_embedded_server_authenticates_on_loopback_and_keeps_fsync_on(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    try:
        password_file = tmp_path / "pg.password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(f"postgresql://postgres:wrong@127.0.0.1:{pg.port}/postgres").close()
        conn = psycopg2.connect(pg.url("postgres"))
        with conn.cursor() as cur:
            cur.execute("SHOW fsync")
            assert cur.fetchone() == ("on",)
        conn.close()
    finally:
        pg.stop()
