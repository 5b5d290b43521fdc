"""Flower's plaintext FedAvg round, run for real beside ours: a SuperLink and N SuperNodes on
loopback in their own virtualenv (scripts/flower_venv.sh), the app in benchmarks/flower_round.

The ClientApp returns the model it receives, so a round measures what ours does without local
training: send the model, collect the updates, average them. The ServerApp prints each round's
wall time, which is parsed from `flwr run --stream`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from fibemrss.tools.paths import REPO_ROOT

REPO = REPO_ROOT
APP_DIR = REPO / "benchmarks" / "flower_round"
_ROUND_LINE = re.compile(r"FIBEMRSS_FLOWER_ROUND (\d+) ([0-9.]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_bin(build: bool) -> Path | None:
    """The Flower virtualenv's bin folder, built first when `build`; None when unavailable."""
    existing = REPO / "var" / "flower-venv" / "bin"
    if (existing / "flwr").exists() and not build:
        return existing
    if not build or not APP_DIR.exists():
        return existing if (existing / "flwr").exists() else None
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "flower_venv.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    return Path(REPO / out.stdout.strip()) if out.returncode == 0 else None


def run_flower_rounds(
    bin_dir: Path, n_params: int, nodes: int, rounds: int, timeout: float = 900
) -> list[float]:
    """Seconds per round of Flower's FedAvg on `nodes` SuperNodes."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fibemrss-flower-") as home:
        port = _free_port()
        Path(home, "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        env = {**os.environ, "FLWR_HOME": home, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        log = open(Path(home, "processes.log"), "wb")  # noqa: SIM115 - closed below
        try:
            procs.append(
                subprocess.Popen(
                    [
                        str(bin_dir / "flower-superlink"),
                        "--insecure",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            time.sleep(3)
            for _ in range(nodes):
                procs.append(
                    subprocess.Popen(
                        [
                            str(bin_dir / "flower-supernode"),
                            "--insecure",
                            "--superlink",
                            f"127.0.0.1:{port}",
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(_free_port()),
                        ],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            time.sleep(5)  # the strategy itself waits until `nodes` SuperNodes are connected
            config = f"num-params={n_params} num-nodes={nodes} num-server-rounds={rounds}"
            run = subprocess.run(
                [str(bin_dir / "flwr"), "run", str(APP_DIR), "local", "--stream", "--run-config", config],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            log.close()
    seconds = [float(m.group(2)) for m in _ROUND_LINE.finditer(run.stdout)]
    if len(seconds) != rounds:
        raise RuntimeError(
            f"Flower run gave {len(seconds)} of {rounds} rounds:\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
        )
    return seconds
