"""What the long-running commands share: a work folder, the endpoints file, waiting for a signal."""

from __future__ import annotations

import json
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def work_folder(arg: str | None) -> Iterator[Path]:
    """The named folder (kept), or a temporary one removed afterwards."""
    if arg:
        yield Path(arg)
        return
    with tempfile.TemporaryDirectory(prefix="fibemrss-") as tmp:
        yield Path(tmp)


def write_endpoints(path: Path, endpoints: dict[str, Any]) -> None:
    """Written whole or not at all: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2))
    tmp.replace(path)


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
