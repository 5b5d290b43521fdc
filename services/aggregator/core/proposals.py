"""Study proposals at the aggregator (domain core: no gRPC, no database).

operator@central proposes a study document; the aggregator stores it as sent with the hash of its
canonical form, so each hospital reviews exactly that document at home. A federation pins the
hash it trains: StartFederation names a proposed hash (or takes the study's latest proposal),
and an agent that holds another document for the same name is refused at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from fibemrss.domain.errors import FailedPrecondition, FieldProblem, InvalidArgument, NotFound
from fibemrss.domain.study import parse_study_field, study_hash

MAX_DOCUMENT_BYTES = 256 * 1024


@dataclass(frozen=True)
class Proposal:
    study: str
    study_hash: str
    version: int
    document: bytes
    proposed_by: str
    proposed_at: datetime | None = None


class ProposalStorePort(Protocol):
    def add_proposal(self, p: Proposal) -> tuple[Proposal, bool]: ...

    def proposal(self, study: str, digest: str | None = None) -> Proposal | None: ...


def propose(store: ProposalStorePort, actor: str, document: bytes) -> tuple[Proposal, bool]:
    """Validates and stores a proposal; (it, whether it was already proposed)."""
    if not document:
        raise InvalidArgument("document is required", [FieldProblem("document", "send the study document")])
    if len(document) > MAX_DOCUMENT_BYTES:
        raise InvalidArgument(
            "document too large", [FieldProblem("document", f"at most {MAX_DOCUMENT_BYTES} bytes")]
        )
    task = parse_study_field(document)
    return store.add_proposal(Proposal(task.name, study_hash(task), task.version, document, actor))


def latest(store: ProposalStorePort, study: str) -> Proposal:
    found = store.proposal(study)
    if found is None:
        raise NotFound(f"no study {study!r} has been proposed")
    return found


def pinned_hash(store: ProposalStorePort, task: str, requested: str) -> str:
    """The hash a new federation of `task` trains: the requested one, which must be proposed, or
    the latest proposal's; "" when the task was never proposed and no hash is asked for."""
    if requested:
        if store.proposal(task, requested) is None:
            raise FailedPrecondition(f"study {task} {requested} was never proposed: ProposeStudy it first")
        return requested
    found = store.proposal(task)
    return "" if found is None else found.study_hash


def check_same_study(task: str, federation_hash: str, hospital: str, sent: str) -> None:
    """An upload or key of a hospital that trains another document of the study is refused."""
    if federation_hash and sent != federation_hash:
        raise FailedPrecondition(
            f"hospital {hospital} trains study {task} {sent or '(no hash sent)'}, "
            f"the federation trains {federation_hash}"
        )
