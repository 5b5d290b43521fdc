"""Flower's plaintext FedAvg round, run for real beside ours: a SuperLink and N SuperNodes on
loopback in their own virtualenv (scripts/flower_venv.sh), the app in benchmarks/flower_round.

The ClientApp returns the model it receives, so a round measures what ours does without local
training: send the model, collect the updates, average them. The ServerApp prints each round's
wall time, which is parsed from `flwr run --stream`. With `tls` (what `bench round` runs, for a
fair pair with our mutual TLS) the SuperLink serves HTTPS with a certificate for 127.0.0.1 from a
CA made for the run, which the SuperNodes and the `flwr` CLI trust.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fibemrss.tools.paths import REPO_ROOT

REPO = REPO_ROOT
APP_DIR = REPO / "benchmarks" / "flower_round"
_ROUND_LINE = re.compile(r"FIBEMRSS_FLOWER_ROUND (\d+) ([0-9.]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, deadline: float) -> None:
    """Until something accepts TCP connections on 127.0.0.1:port (RuntimeError past `deadline`)."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Flower's SuperLink did not listen on port {port}") from None
            time.sleep(0.2)


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


def _loopback_tls(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a throwaway CA and a certificate for 127.0.0.1."""
    now = datetime.now(UTC)

    def certificate(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("flower bench CA", ca_key, "flower bench CA", ca_key, True)
    server = certificate("127.0.0.1", server_key, "flower bench CA", ca_key, False)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    paths[2].chmod(0o600)
    return paths


def run_flower_rounds(
    bin_dir: Path, n_params: int, nodes: int, rounds: int, timeout: float = 900, tls: bool = False
) -> list[float]:
    """Seconds per round of Flower's FedAvg on `nodes` SuperNodes (`tls`: over HTTPS)."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="fibemrss-flower-") as home:
        port = _free_port()
        if tls:
            ca, cert, key = _loopback_tls(Path(home))
            link_security = [
                "--ssl-ca-certfile",
                str(ca),
                "--ssl-certfile",
                str(cert),
                "--ssl-keyfile",
                str(key),
            ]
            node_security = ["--root-certificates", str(ca)]
            cli_security = f'root-certificates = "{ca}"\n'
        else:
            link_security, node_security, cli_security = ["--insecure"], ["--insecure"], "insecure = true\n"
        Path(home, "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n{cli_security}'
        )
        env = {**os.environ, "FLWR_HOME": home, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        log = open(Path(home, "processes.log"), "wb")  # noqa: SIM115 - closed below
        try:
            procs.append(
                subprocess.Popen(
                    [
                        str(bin_dir / "flower-superlink"),
                        *link_security,
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
            _wait_listening(port, time.monotonic() + 120)  # a loaded machine starts it slowly
            for _ in range(nodes):
                procs.append(
                    subprocess.Popen(
                        [
                            str(bin_dir / "flower-supernode"),
                            *node_security,
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
