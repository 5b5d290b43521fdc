"""The studies this build knows: the documents shipped in fibemrss/domain/studies/ (read once,
like constants: they are package data, not input), and any a service is given by file."""

from __future__ import annotations

from fibemrss.domain.errors import InvalidArgument, NotFound
from fibemrss.domain.study import parse_study, shipped_documents
from fibemrss.domain.task_spec import TaskSpec


def _shipped() -> dict[str, TaskSpec]:
    out: dict[str, TaskSpec] = {}
    for file, content in sorted(shipped_documents().items()):
        task = parse_study(content, file)
        if task.name in out:
            raise InvalidArgument(f"two shipped studies are named {task.name!r}")
        out[task.name] = task
    return out


TASKS: dict[str, TaskSpec] = _shipped()
HEART_DISEASE_V1 = TASKS["heart-disease-v1"]
# The same study with patient-level DP-SGD, used by `fibemrss demo --dp`.
HEART_DISEASE_V1_DP = TASKS["heart-disease-v1-dp"]


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise NotFound(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def register(task: TaskSpec) -> TaskSpec:
    """Adds a study given as a document file (FIBEMRSS_STUDY_FILE); refuses to replace a known
    study by a different document of the same name."""
    known = TASKS.get(task.name)
    if known is not None and known != task:
        raise InvalidArgument(f"study {task.name!r} is already known with different content")
    TASKS[task.name] = task
    return task
