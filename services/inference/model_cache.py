"""Serves model versions from the hospital's model store and picks up new ones without a restart.

A poller swaps in the newest version as one reference assignment, so a request sees either the
old or the new model, never half of one; pinned versions are loaded on demand and kept.
"""

from __future__ import annotations

import logging
import threading

from fibemrss.errors import NotFound
from fibemrss.model_store import ModelStore
from fibemrss.task_spec import TaskSpec
from services.inference.diagnosis import LoadedModel

log = logging.getLogger(__name__)


class ModelCache:
    def __init__(self, store: ModelStore, task: TaskSpec, poll_seconds: float = 1.0) -> None:
        self._store = store
        self._task = task
        self._poll_seconds = poll_seconds
        self._newest: LoadedModel | None = None
        self._pinned: dict[int, LoadedModel] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def refresh(self) -> None:
        latest = self._store.latest_version(self._task.name)
        if latest is None or (self._newest is not None and self._newest.version == latest):
            return
        mv = self._store.get(self._task.name, latest)
        self._newest = LoadedModel.from_json(self._task, mv.version, mv.federated_round, mv.model)
        log.info("model version loaded", extra={"task": self._task.name, "version": mv.version})

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep serving the loaded model if the store blips
                log.exception("model refresh failed")

    def get(self, version: int = 0) -> LoadedModel:
        newest = self._newest
        if version == 0 or (newest is not None and newest.version == version):
            if newest is None:
                raise NotFound(f"no model version of {self._task.name} is published yet")
            return newest
        with self._lock:
            if version not in self._pinned:
                mv = self._store.get(self._task.name, version)
                self._pinned[version] = LoadedModel.from_json(
                    self._task, mv.version, mv.federated_round, mv.model
                )
            return self._pinned[version]
