"""What the federation operator's console shows (`operator@central` as a person signed in with
OpenID Connect; docs/console.md): each federation with its settings, its rounds over time (state,
who submitted, the cohort, why a round failed) and each hospital's part in it; each proposed study
with the federations that train it. The aggregator never learns a hospital's decision itself (it is
taken and kept at the hospital, docs/studies.md): what it sees is whether the hospital's agent
takes part. Read-only; every view is audited. No HTTP and no database here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.aggregator.core.proposals import Proposal
from services.aggregator.core.round_state import FederationSettings, Round, RoundState


class FederationConsoleStorePort(Protocol):
    def tasks(self) -> list[str]: ...

    def settings(self, task: str) -> FederationSettings: ...

    def rounds(self, task: str) -> list[Round]: ...

    def failure(self, task: str, number: int) -> str: ...

    def proposals(self) -> list[Proposal]: ...

    def audit(self, actor: str, action: str, subject: str = "") -> None: ...


@dataclass(frozen=True)
class RoundView:
    number: int
    state: str
    deadline_at: datetime
    submitted: tuple[str, ...]
    cohort: tuple[str, ...] | None
    attempt: int
    failure: str


@dataclass(frozen=True)
class Participant:
    hospital: str
    rounds_submitted: int
    last_round: int | None  # the last round it submitted to
    missed: tuple[int, ...]  # finished rounds without its submission

    @property
    def taking_part(self) -> bool:
        return self.rounds_submitted > 0


@dataclass(frozen=True)
class FederationView:
    settings: FederationSettings
    rounds: list[RoundView]
    participants: list[Participant]

    @property
    def current(self) -> RoundView | None:
        return self.rounds[-1] if self.rounds else None


@dataclass(frozen=True)
class ProposalView:
    proposal: Proposal
    federations: list[str]  # the federations pinned to this document's hash
    taking_part: dict[str, bool]  # per hospital of those federations: has its agent submitted


FINISHED = (RoundState.CLOSED, RoundState.FAILED)


def _participants(settings: FederationSettings, rounds: list[Round]) -> list[Participant]:
    out = []
    for h in settings.hospitals:
        mine = [r.number for r in rounds if h in r.submitted]
        missed = tuple(r.number for r in rounds if r.state in FINISHED and h not in r.submitted)
        out.append(Participant(h, len(mine), mine[-1] if mine else None, missed))
    return out


class FederationConsole:
    def __init__(self, store: FederationConsoleStorePort) -> None:
        self._store = store

    def federations(self, actor: str) -> list[FederationView]:
        views = []
        for task in self._store.tasks():
            settings = self._store.settings(task)
            rounds = self._store.rounds(task)
            views.append(
                FederationView(
                    settings,
                    [
                        RoundView(
                            r.number,
                            r.state.value,
                            r.deadline_at,
                            tuple(sorted(r.submitted)),
                            None if r.cohort is None else tuple(sorted(r.cohort)),
                            r.attempt,
                            self._store.failure(task, r.number) if r.state == RoundState.FAILED else "",
                        )
                        for r in rounds
                    ],
                    _participants(settings, rounds),
                )
            )
        self._store.audit(actor, "console_read_federations", f"n={len(views)}")
        return views

    def proposals(self, actor: str) -> list[ProposalView]:
        federations = self.federations(actor)
        out = []
        for p in self._store.proposals():
            pinned = [f for f in federations if f.settings.study_hash == p.study_hash]
            taking_part = {x.hospital: x.taking_part for f in pinned for x in f.participants}
            out.append(ProposalView(p, [f.settings.task for f in pinned], taking_part))
        return out

    def note_sign_in(self, actor: str, roles: str) -> None:
        self._store.audit(actor, "console_sign_in", f"roles={roles}")
