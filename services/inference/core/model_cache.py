"""Serves model versions from the hospital's model store and picks up new ones without a restart.

The version served by default is the store's first servable one: the newest, except that a
standby version (a personalized model that lost the validation choice) comes after the others.
A poller swaps in the newest version as one reference assignment, so a request sees either the
old or the new model, never half of one, and never waits for the swap. The version it replaces
stays in memory, so requests pinned to it keep being served without a database round trip;
other pinned versions are loaded on demand and kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from fibemrss.domain.errors import FieldProblem, InvalidArgument, NotFound
from fibemrss.domain.published_model import ModelVersion
from fibemrss.domain.task_spec import TaskSpec
from services.inference.core.diagnosis import LoadedModel
from services.inference.core.input_limits import PatientInputs

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """The hospital's model store, as the cache reads it (`fibemrss.db.model_store.ModelStore`)."""

    def servable_versions(self, task: str) -> list[int]: ...

    def get(self, task: str, version: int | None = None) -> ModelVersion: ...


class ModelCache:
    def __init__(self, store: ModelSource, task: TaskSpec, poll_seconds: float = 1.0) -> None:
        self._store = store
        self._task = task
        self._poll_seconds = poll_seconds
        self._newest: LoadedModel | None = None
        self._older: dict[int, LoadedModel] = {}
        self._servable: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="model-poller", daemon=True)
        # How a request's patient values are read and checked for this study (Diagnose, CDS Hooks).
        self.inputs = PatientInputs(task)

    @property
    def task(self) -> TaskSpec:
        return self._task

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        servable = self._store.servable_versions(self._task.name)
        latest = servable[0] if servable else None
        current = self._newest
        with self._lock:
            self._servable = servable
            # A retired version is served no more, pinned or not.
            for version in [v for v in self._older if v not in servable]:
                del self._older[version]
        if latest is None or (current is not None and current.version == latest):
            return
        mv = self._store.get(self._task.name, latest)
        # Decoded before the swap: requests keep using `current` until the new one is complete.
        loaded = LoadedModel.from_version(self._task, mv)
        with self._lock:
            current = self._newest
            if current is not None and current.version == loaded.version:
                return  # another refresh (poller or first request) got there first
            if not self._servable or self._servable[0] != loaded.version:
                return  # a later refresh saw another newest version (e.g. this one was retired)
            if current is not None and current.version in servable:
                self._older[current.version] = current
            self._older.pop(loaded.version, None)
            # Usually newer; older when the newest was retired (a rollback).
            self._newest = loaded
        log.info("model version loaded", extra={"task": self._task.name, "version": mv.version})

    def _poll(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep serving the loaded model if the store blips
                log.exception("model refresh failed")

    @property
    def ready(self) -> bool:
        """True once a version is loaded; from then on there is always one to serve."""
        return self._newest is not None

    def get(self, version: int = 0) -> LoadedModel:
        """The newest version (0) or a pinned one; NotFound if it was never published."""
        newest = self._newest
        if newest is None:
            # Nothing loaded yet: look now rather than wait for the poller, so the first request
            # after the first publication already gets it.
            self.refresh()
            newest = self._newest
        if version == 0 or (newest is not None and newest.version == version):
            if newest is None:
                raise NotFound(f"no model version of {self._task.name} is published yet")
            return newest
        held = self._older.get(version)
        if held is not None:
            return held
        with self._lock:
            if version not in self._older:
                mv = self._store.get(self._task.name, version)
                self._older[version] = LoadedModel.from_version(self._task, mv)
            return self._older[version]

    def has(self, version: int) -> bool:
        try:
            self.get(version)
        except NotFound:
            return False
        return True

    def versions(self) -> list[int]:
        """Every servable (published, not retired) version as of the last poll, newest first."""
        with self._lock:
            return list(self._servable)


class StudyModels:
    """Every study this hospital serves, each its own cache (its own versions, its own poller).

    One inference service answers for all of a hospital's studies: each study is its own KServe
    model, its own CDS Hooks service and its own Diagnose target. `discover` (optional) names the
    studies to serve now, read again every `poll_seconds`: the studies the hospital approved since
    start are added and those it withdrew are dropped, without a restart (docs/studies.md).
    """

    def __init__(
        self,
        store: ModelSource,
        studies: list[TaskSpec],
        poll_seconds: float = 1.0,
        discover: Callable[[], list[TaskSpec]] | None = None,
    ) -> None:
        self._store = store
        self._poll_seconds = poll_seconds
        self._fixed = list(studies)
        self._discover = discover
        self._caches: dict[str, ModelCache] = {t.name: ModelCache(store, t, poll_seconds) for t in studies}
        self._lock = threading.Lock()
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="study-watcher", daemon=True)

    @classmethod
    def of(cls, *caches: ModelCache) -> StudyModels:
        """The studies of caches made (and started) by the caller: a fixed set."""
        out = cls(caches[0]._store, [])
        out._caches = {c.task.name: c for c in caches}
        return out

    def start(self) -> None:
        self._started = True
        self.sync()
        for cache in self._all():
            cache.start()
        if self._discover is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for cache in self._all():
            cache.stop()

    def _all(self) -> list[ModelCache]:
        with self._lock:
            return list(self._caches.values())

    def sync(self) -> None:
        """Serves the fixed studies and those `discover` names now; drops the others."""
        if self._discover is None:
            return
        wanted = {t.name: t for t in self._fixed}
        for task in self._discover():
            wanted.setdefault(task.name, task)
        with self._lock:
            gone = [c for name, c in self._caches.items() if name not in wanted]
            added = [
                ModelCache(self._store, t, self._poll_seconds)
                for n, t in wanted.items()
                if n not in self._caches
            ]
            # A study approved again with another document is served with the new one.
            changed = [c for n, c in self._caches.items() if n in wanted and c.task != wanted[n]]
            added += [ModelCache(self._store, wanted[c.task.name], self._poll_seconds) for c in changed]
            for cache in gone + changed:
                del self._caches[cache.task.name]
            for cache in added:
                self._caches[cache.task.name] = cache
        for cache in gone + changed:
            cache.stop()
            log.info("study no longer served", extra={"task": cache.task.name})
        for cache in added:
            if self._started:
                cache.start()
            log.info("study served", extra={"task": cache.task.name})

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - keep serving the studies known if the store blips
                log.exception("study list refresh failed")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._caches)

    def tasks(self) -> list[TaskSpec]:
        with self._lock:
            return [self._caches[n].task for n in sorted(self._caches)]

    def cache(self, name: str) -> ModelCache:
        """The study's cache; NotFound naming the studies served."""
        with self._lock:
            found = self._caches.get(name)
        if found is None:
            served = ", ".join(self.names()) or "none yet"
            raise NotFound(f"this hospital serves no study {name[:80]!r}; it serves: {served}")
        return found

    def chosen(self, name: str, field: str) -> ModelCache:
        """The study a request names in `field`; an empty name is the one study when only one is
        served, and otherwise INVALID_ARGUMENT listing them (the caller must say which)."""
        if name:
            return self.cache(name)
        with self._lock:
            only = list(self._caches.values())
        if len(only) == 1:
            return only[0]
        served = ", ".join(self.names()) or "none yet"
        raise InvalidArgument(
            "which study?",
            [FieldProblem(field, f"is required: this hospital serves several studies ({served})")],
        )

    @property
    def ready(self) -> bool:
        """True once some study's model is loaded (a newly approved study has none for a while,
        and must not take the others' models out of service)."""
        return any(c.ready for c in self._all())
