"""One FIBEMRSS service as a child process: started with its environment, ready once its ready
file (written by fibemrss.platform.server after binding) names the ports it got."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MODULES = {
    "gateway": "services.emr_gateway",
    "agent": "services.hospital_agent",
    "inference": "services.inference",
    "aggregator": "services.aggregator",
}


def base_env() -> dict[str, str]:
    """This process's environment without FIBEMRSS settings, with loopback port-0 listeners."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIBEMRSS_") and k != "DATABASE_URL"}
    env.update(FIBEMRSS_LISTEN="127.0.0.1:0", FIBEMRSS_METRICS_LISTEN="127.0.0.1:0")
    # Services share two cores: one math thread each.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class ServiceProcess:
    name: str  # "<role>@<site>", e.g. "gateway@cleveland"
    env: dict[str, str]
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    metrics: str = ""
    # The other listeners the service named in its ready file: "mllp", "fhir", "kserve_http", ...
    edges: dict[str, str] = field(default_factory=dict)
    # Where it runs (its code is imported from there first); None: this process's directory.
    cwd: Path | None = None
    _started: float = field(default=0.0, repr=False)

    @property
    def role(self) -> str:
        return self.name.split("@")[0]

    @property
    def ready_file(self) -> Path:
        return self.workdir / "run" / f"{self.name}.json"

    @property
    def log_file(self) -> Path:
        return self.workdir / "logs" / f"{self.name}.log"

    def start(self) -> None:
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        self.address = self.metrics = ""
        env = {**self.env, "FIBEMRSS_READY_FILE": str(self.ready_file)}
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", MODULES[self.role]],
                env=env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: a stop reaches its children too
            )

    def wait_ready(self, deadline: float) -> str:
        """Blocks until the service is serving (its address), or raises with its log's tail."""
        assert self.process is not None, "start() first"
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not become ready in time:\n{self.log_tail()}")
            time.sleep(0.05)
        info = json.loads(self.ready_file.read_text())
        self.address, self.metrics = info["grpc"], info["metrics"]
        self.edges = {k: v for k, v in info.items() if k not in ("grpc", "metrics", "pid")}
        return self.address

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> None:
        """Waits for the process to end; past `timeout`, kills its whole process group."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it ended between the timeout and the kill
            self.process.wait(timeout=10)

    def exit_code_of_start(self, timeout: float = 60.0) -> int | None:
        """Starts a service expected to refuse its configuration; its exit code once it ended
        (None: still running after `timeout`, then stopped)."""
        self.start()
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            self.stop()

    def stop(self, grace: float = 15.0) -> None:
        self.signal(signal.SIGTERM)
        self.wait(grace)

    def __enter__(self) -> ServiceProcess:
        self.start()
        try:
            self.wait_ready(time.monotonic() + 60)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
