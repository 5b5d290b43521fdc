"""A hospital's site policy: what a study must respect before the hospital may approve it (pure).

The policy is the hospital's own document (YAML or JSON, kept in its database by `fibemrss study
policy set`): the model factories it allows beside the built-in models, the smallest eligible
cohort it takes part with, the most privacy a study may spend on its records, and the code
systems a study may read. `policy_problems` names every rule a study breaks; nothing here imports
a model factory (a study's model is checked by its name only, so a factory that is not allowed is
never imported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from fibemrss.domain.errors import FieldProblem, InvalidArgument
from fibemrss.domain.privacy_accounting import epsilon_after_rounds
from fibemrss.domain.study import MODELS
from fibemrss.domain.task_spec import TaskSpec

FORMAT = 1
FIELDS = {"format", "model_factories", "min_eligible", "max_epsilon", "require_dp", "code_systems"}
DEFAULT_CODE_SYSTEMS = (
    "http://loinc.org",
    "http://snomed.info/sct",
    "http://hl7.org/fhir/sid/icd-10",
    "http://hl7.org/fhir/sid/icd-10-cm",
    "urn:fibemrss:uci-heart",
)


@dataclass(frozen=True)
class SitePolicy:
    # `package.module:factory` names a study may run beside the built-in models (none by default).
    model_factories: tuple[str, ...] = ()
    # The fewest eligible patients (counted by the hospital's own gateway) it takes part with.
    min_eligible: int = 50
    # The largest total epsilon of a DP study over all its rounds (None: no limit).
    max_epsilon: float | None = None
    # Refuse studies that train without patient-level DP.
    require_dp: bool = False
    code_systems: tuple[str, ...] = DEFAULT_CODE_SYSTEMS


DEFAULT_POLICY = SitePolicy()


def parse_site_policy(content: str | bytes, source: str = "policy") -> SitePolicy:
    """A site policy document; InvalidArgument naming every bad field."""
    try:
        raw = yaml.safe_load(content)
    except yaml.YAMLError:
        raise InvalidArgument(
            "unreadable site policy", [FieldProblem(source, "is not YAML or JSON")]
        ) from None
    if not isinstance(raw, dict):
        raise InvalidArgument("invalid site policy", [FieldProblem(source, "must be a mapping")])
    problems = [FieldProblem(str(k), "is not a field of a site policy") for k in raw if k not in FIELDS]
    if raw.get("format", FORMAT) != FORMAT:
        problems.append(FieldProblem("format", f"this build reads site policy format {FORMAT}"))

    def names(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            problems.append(FieldProblem(key, "must be a list of non-empty names"))
            return default
        return tuple(value)

    factories = names("model_factories", ())
    for i, f in enumerate(factories):
        if ":" not in f:
            problems.append(FieldProblem(f"model_factories[{i}]", "name a factory as package.module:factory"))
    min_eligible = raw.get("min_eligible", DEFAULT_POLICY.min_eligible)
    if isinstance(min_eligible, bool) or not isinstance(min_eligible, int) or min_eligible < 1:
        problems.append(FieldProblem("min_eligible", "must be a whole number of patients, at least 1"))
        min_eligible = DEFAULT_POLICY.min_eligible
    max_epsilon = raw.get("max_epsilon")
    if max_epsilon is not None and (
        isinstance(max_epsilon, bool)
        or not isinstance(max_epsilon, int | float)
        or not math.isfinite(max_epsilon)
        or max_epsilon <= 0
    ):
        problems.append(FieldProblem("max_epsilon", "must be a positive number (or absent: no limit)"))
        max_epsilon = None
    require_dp = raw.get("require_dp", False)
    if not isinstance(require_dp, bool):
        problems.append(FieldProblem("require_dp", "must be true or false"))
        require_dp = False
    systems = names("code_systems", DEFAULT_CODE_SYSTEMS)
    if problems:
        raise InvalidArgument("invalid site policy", problems)
    return SitePolicy(
        factories, min_eligible, None if max_epsilon is None else float(max_epsilon), require_dp, systems
    )


def policy_to_json(p: SitePolicy) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model_factories": list(p.model_factories),
        "min_eligible": p.min_eligible,
        "max_epsilon": p.max_epsilon,
        "require_dp": p.require_dp,
        "code_systems": list(p.code_systems),
    }


def study_code_systems(task: TaskSpec) -> list[str]:
    """Every code system the study reads: its features, its label and its cohort's requirements."""
    systems = [f.system for f in task.features if f.system]
    systems += [task.label.system] + [s for s, _ in task.cohort.required]
    return sorted(set(systems))


def study_epsilon(task: TaskSpec) -> float | None:
    """The epsilon a DP study spends on a hospital's records over all its rounds; None without DP."""
    return None if task.dp is None else epsilon_after_rounds(task, task.dp, task.rounds)


def policy_problems(policy: SitePolicy, task: TaskSpec, eligible: int | None = None) -> list[FieldProblem]:
    """Every rule of the policy the study breaks, each named by the rule. `eligible` None skips
    the cohort rule (a check made without asking the gateway, as the agent's at join)."""
    out: list[FieldProblem] = []
    if task.model not in MODELS and task.model not in policy.model_factories:
        allowed = ", ".join([*MODELS, *policy.model_factories])
        out.append(
            FieldProblem("model_factories", f"model {task.model} is not allowed here (allowed: {allowed})")
        )
    if eligible is not None and eligible < policy.min_eligible:
        out.append(
            FieldProblem(
                "min_eligible",
                f"{eligible} eligible patients here, the policy needs at least {policy.min_eligible}",
            )
        )
    if task.dp is None and policy.require_dp:
        out.append(FieldProblem("require_dp", "the study trains without patient-level DP"))
    spend = study_epsilon(task)
    if spend is not None and policy.max_epsilon is not None and spend > policy.max_epsilon:
        out.append(
            FieldProblem(
                "max_epsilon",
                f"the study spends epsilon {spend:.3g}, the policy allows {policy.max_epsilon:g}",
            )
        )
    foreign = [s for s in study_code_systems(task) if s not in policy.code_systems]
    if foreign:
        out.append(FieldProblem("code_systems", f"the study reads {', '.join(foreign)}, not allowed here"))
    return out


@dataclass(frozen=True)
class StudyDecision:
    """A hospital operator's decision on one study document (its hash), as recorded."""

    study: str
    study_hash: str
    version: int
    decision: str  # "approved" or "refused"
    reason: str
    eligible: int | None
    decided_by: str
    decided_at: str  # ISO 8601

    @property
    def approved(self) -> bool:
        return self.decision == "approved"


def approval_problem(hospital: str, study: str, wanted_hash: str, latest: StudyDecision | None) -> str:
    """Why a hospital does not take part in a study document ("" when its latest decision approves it)."""
    if latest is not None and latest.approved:
        return ""
    if latest is None:
        return (
            f"study {study} {wanted_hash} is not approved at hospital {hospital}: "
            "review it with `fibemrss study review`, then `fibemrss study approve`"
        )
    return f"study {study} {wanted_hash} was refused at hospital {hospital} by {latest.decided_by}" + (
        f": {latest.reason}" if latest.reason else ""
    )
