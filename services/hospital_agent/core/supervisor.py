"""The agent's top level: one `Participation` per study, each in its own thread (no gRPC, no database).

A hospital takes part in every study it approved, each in its own federation. Each study runs
today's single-study loop (`Participation.run`) in its own thread, with its own failure handling
and backoff, so one study's error, stall or refused round never delays another: the round
protocol is untouched by there being several. The supervisor only decides which studies run:

- the studies named in the configuration (FIBEMRSS_STUDIES, or the one of FIBEMRSS_TASK /
  FIBEMRSS_STUDY_FILE) always have a runner; until the hospital approves one, its runner says why
  it does not take part, as a single-study agent always did;
- with `approved` in FIBEMRSS_STUDIES, every other study whose latest decision here is an approval
  (its document as the operator approved it) gets a runner when approved, without a restart;
- a study whose federation finished gets a fresh runner when the aggregator starts a new federation
  of it (another federation id), so re-running a study needs no restart either;
- a study whose approval is withdrawn (a later refusal of its hash) is retired: its runner is
  stopped, so it reads no further example and sends nothing more; a named study then gets a fresh
  runner, which waits for a new approval and says so in its status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fibemrss.domain.errors import FieldProblem, InvalidArgument, NotFound
from fibemrss.domain.site_policy import StudyDecision
from fibemrss.domain.study import study_hash
from fibemrss.domain.task_spec import TaskSpec
from services.hospital_agent.core.protocol import Participation

log = logging.getLogger(__name__)


class StudyApprovals(Protocol):
    """The hospital's study decisions (`fibemrss.db.study_approvals.StudyStore`)."""

    def approved_studies(self) -> list[TaskSpec]: ...

    def latest_decision(self, study: str, digest: str) -> StudyDecision | None: ...


@dataclass
class StudyRunner:
    """One study's participation and the thread that runs it."""

    participation: Participation
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    named: bool = False  # named in the configuration (kept when not approved)
    was_approved: bool = False  # the latest decision seen on its hash was an approval

    @property
    def task(self) -> TaskSpec:
        return self.participation.task

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Supervisor:
    def __init__(
        self,
        named: Sequence[TaskSpec],
        make: Callable[[TaskSpec], Participation],
        approvals: StudyApprovals | None = None,
        follow_approved: bool = False,
        poll_seconds: float = 2.0,
        on_retired: Callable[[str], None] | None = None,
        federation_of: Callable[[TaskSpec], bytes] | None = None,
    ) -> None:
        """`make` builds a study's participation (its own aggregator and gateway clients, its own
        health callback); `approvals` are read every `poll_seconds`; `on_retired` is told the name
        of a study retired (its failures no longer count for the service's health);
        `federation_of` names the federation the aggregator runs for a study now (a finished
        study is joined again when it changes)."""
        if follow_approved and approvals is None:
            raise ValueError("following the approvals needs the hospital's study decisions")
        self._named = {t.name: t for t in named}
        self._make = make
        self._approvals = approvals
        self._follow = follow_approved
        self._poll_seconds = poll_seconds
        self._on_retired = on_retired
        self._federation_of = federation_of
        self._runners: dict[str, StudyRunner] = {}
        # Stopped runners whose threads have not left their round yet (a long poll at the aggregator
        # ends within its wait): a study's fresh runner starts only once its old one has left.
        self._leaving: list[StudyRunner] = []
        self.retired: dict[str, str] = {}  # study -> why it was retired (for the status)
        self._lock = threading.Lock()
        for task in named:
            self._runners[task.name] = StudyRunner(make(task), named=True)

    # -- what runs ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Starts the runners and keeps them in step with the approvals until `stop`; then stops
        every runner."""
        try:
            while not stop.is_set():
                try:
                    self.sync()
                except Exception:  # noqa: BLE001 - the runners go on; the next poll tries again
                    log.exception("study approvals could not be read; the running studies go on")
                stop.wait(self._poll_seconds)
        finally:
            self.stop_all()

    def sync(self) -> None:
        """One step: start what should run, retire what was withdrawn or replaced."""
        approved: dict[str, TaskSpec] = {}
        if self._follow and self._approvals is not None:
            # A study named in the configuration runs its own document, whatever else is approved.
            approved = {t.name: t for t in self._approvals.approved_studies() if t.name not in self._named}
        # The database and the aggregator are read outside the lock, so status calls never wait
        # on them; a runner retired or replaced meanwhile is only compared by identity below.
        with self._lock:
            current = dict(self._runners)
        decisions = {name: self._decision(r.task) for name, r in current.items()}
        rejoin = {name for name, r in current.items() if self._new_federation(r)}
        with self._lock:
            self._leaving = [r for r in self._leaving if r.alive]
            for name, runner in list(self._runners.items()):
                if current.get(name) is not runner:
                    continue  # added since the reads: judged at the next poll
                if decisions[name] == "approved":
                    runner.was_approved = True
                    if runner.named or approved.get(name) == runner.task:
                        continue
                    reason = f"another document of {name} was approved here since"
                elif runner.named and not runner.was_approved:
                    continue  # not approved yet: its runner waits and says why in the status
                else:
                    reason = f"the approval of {name} ({study_hash(runner.task)}) was withdrawn here"
                self._retire(runner, reason)
                del self._runners[name]
            for name in rejoin:
                finished = self._runners.get(name)
                if finished is not None and finished is current[name]:
                    self._runners[name] = StudyRunner(
                        self._make(finished.task), named=finished.named, was_approved=finished.was_approved
                    )
                    log.info("new federation of a finished study: joining it", extra={"task": name})
            leaving = {r.task.name for r in self._leaving}
            wanted = [(t, True) for t in self._named.values()] + [(t, False) for t in approved.values()]
            for task, named in wanted:
                if task.name in self._runners or task.name in leaving:
                    continue  # running, or its retired runner has not left its round yet
                self._runners[task.name] = StudyRunner(self._make(task), named=named, was_approved=not named)
                if not named:
                    self.retired.pop(task.name, None)
                    log.info("study joined", extra={"task": task.name})
            for runner in self._runners.values():
                if runner.thread is None:
                    runner.thread = threading.Thread(
                        target=runner.participation.run,
                        args=(runner.stop,),
                        name=f"study-{runner.task.name}",
                        daemon=True,
                    )
                    runner.thread.start()

    def _new_federation(self, runner: StudyRunner) -> bool:
        """Whether a runner finished its federation and the aggregator now runs another of its study."""
        if self._federation_of is None or runner.alive or not runner.participation.progress.done:
            return False
        finished = runner.participation.federation_id
        try:
            current = self._federation_of(runner.task)
        except Exception:  # noqa: BLE001 - the aggregator unreachable: asked again at the next poll
            return False
        return bool(current) and current != finished

    def _decision(self, task: TaskSpec) -> str:
        if self._approvals is None:
            return "approved"  # no decisions to follow (tests): every named study runs
        latest = self._approvals.latest_decision(task.name, study_hash(task))
        return "" if latest is None else latest.decision

    def _retire(self, runner: StudyRunner, reason: str) -> None:
        runner.stop.set()
        self._leaving.append(runner)
        self.retired[runner.task.name] = reason
        if self._on_retired is not None:
            self._on_retired(runner.task.name)
        log.warning("study retired", extra={"task": runner.task.name, "reason": reason})

    def stop_all(self, join_seconds: float = 10.0) -> None:
        with self._lock:
            runners = list(self._runners.values()) + self._leaving
        for runner in runners:
            runner.stop.set()
        for runner in runners:
            if runner.thread is not None:
                runner.thread.join(timeout=join_seconds)

    # -- what is asked ------------------------------------------------------------------------------
    def participations(self) -> list[Participation]:
        """Every study taking part (or waiting for its approval), by name."""
        with self._lock:
            return [self._runners[n].participation for n in sorted(self._runners)]

    def leaving(self) -> list[str]:
        """Retired studies whose runner has not stopped yet."""
        with self._lock:
            return sorted(r.task.name for r in self._leaving if r.alive)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._runners)

    def participation(self, name: str, field_name: str = "task") -> Participation:
        """The study a request names; empty is the one study when there is only one, and otherwise
        INVALID_ARGUMENT listing them. A retired study is NOT_FOUND with why."""
        with self._lock:
            runners = dict(self._runners)
        if name:
            if name in runners:
                return runners[name].participation
            if name in self.retired:
                raise NotFound(f"{name} is retired at this hospital: {self.retired[name]}")
            listed = ", ".join(sorted(runners)) or "none"
            raise NotFound(f"this agent takes part in {listed}, not {name[:80]!r}")
        if len(runners) == 1:
            return next(iter(runners.values())).participation
        listed = ", ".join(sorted(runners)) or "none yet"
        raise InvalidArgument(
            "which study?",
            [
                FieldProblem(
                    field_name, f"is required: this hospital takes part in several studies ({listed})"
                )
            ],
        )
